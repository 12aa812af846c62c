"""Guide families, objectives, training, evaluation and diagnostics (``probvq.inference``).

* :mod:`.families`: the guide families, one file each, and their registry;
* :mod:`.objectives`: ELBO terms from traces, the training ELBO, evaluation, importance weights;
* :mod:`.training`: ``fit`` and checkpoints;
* :mod:`.diagnostics`: IWAE, PSIS, memory caps, ArviZ export and plots.
"""

from .diagnostics import Diagnostics, diagnose
from .families import (
    FAMILIES,
    RR,
    SQ,
    VQ,
    FamilyStack,
    GaussianQuantiser,
    GuideFamily,
    RelaxedBernoulli,
    RelaxedFamily,
    TemperatureSchedule,
)
from .objectives import (
    CodeELBO,
    ElboTerms,
    PointTerms,
    code_indices,
    elbo_terms,
    evaluate,
    point_terms,
    run_traces,
)
from .training import RunDir, TrainResult, fit, load_checkpoint, save_checkpoint

__all__ = [
    "FAMILIES",
    "RR",
    "SQ",
    "VQ",
    "CodeELBO",
    "Diagnostics",
    "ElboTerms",
    "FamilyStack",
    "GaussianQuantiser",
    "GuideFamily",
    "PointTerms",
    "RelaxedBernoulli",
    "RelaxedFamily",
    "RunDir",
    "TemperatureSchedule",
    "TrainResult",
    "code_indices",
    "diagnose",
    "elbo_terms",
    "evaluate",
    "fit",
    "load_checkpoint",
    "point_terms",
    "run_traces",
    "save_checkpoint",
]
