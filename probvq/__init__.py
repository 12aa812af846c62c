"""probvq: hierarchical discrete VAEs as explicit Pyro programs.

The core vocabulary lives here (code spaces, codebooks, code distributions, the code-site protocol,
likelihoods, networks, data). Models are in :mod:`probvq.models`, guide families, training and
evaluation in :mod:`probvq.inference`; :func:`probvq.build.build` composes them.
"""

from probvq.codebook import Codebook, perplexity
from probvq.codes import CodeCategorical, CodePoint, Concrete, StraightThrough
from probvq.sites import DATA_PLATE, CodeRequest, CodeSite, code
from probvq.spaces import BinaryUnits, CodeSpace

__version__ = "0.1.0"

__all__ = [
    "DATA_PLATE",
    "BinaryUnits",
    "CodeCategorical",
    "CodePoint",
    "CodeRequest",
    "CodeSite",
    "CodeSpace",
    "Codebook",
    "Concrete",
    "StraightThrough",
    "code",
    "perplexity",
]
