"""probvq: hierarchical discrete VAEs as explicit Pyro programs.

The core vocabulary lives here (code spaces, codebooks, code distributions, priors and rates, the
code-site protocol, between-step hooks, likelihoods, networks, data). Models are in
:mod:`probvq.models`, guide families, training and evaluation in :mod:`probvq.inference`;
:func:`probvq.build.build` composes them.
"""

from probvq.codebook import Codebook, perplexity
from probvq.codes import CodeCategorical, CodePoint, Concrete, StraightThrough
from probvq.factors import prior_factor, regulariser
from probvq.hooks import after_step, before_evaluation, before_run, discard_step
from probvq.priors import AutoregressivePrior, EnergyPrior
from probvq.rates import rate
from probvq.rbm import RBM, RBMPrior, ais
from probvq.sites import DATA_PLATE, CodeGroup, CodeRequest, CodeSite, code
from probvq.spaces import BinaryUnits, CodeSpace

__version__ = "0.2.0"

__all__ = [
    "DATA_PLATE",
    "RBM",
    "AutoregressivePrior",
    "BinaryUnits",
    "CodeCategorical",
    "CodeGroup",
    "CodePoint",
    "CodeRequest",
    "CodeSite",
    "CodeSpace",
    "Codebook",
    "Concrete",
    "EnergyPrior",
    "RBMPrior",
    "StraightThrough",
    "after_step",
    "ais",
    "before_evaluation",
    "before_run",
    "code",
    "discard_step",
    "perplexity",
    "prior_factor",
    "rate",
    "regulariser",
]
