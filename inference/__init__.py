"""Guide families, objectives, training, evaluation and checkpoints (``probvq.inference``)."""

from .checkpoint import RunDir, load_checkpoint, save_checkpoint
from .diagnostics import Diagnostics, diagnose
from .evaluate import PointTerms, evaluate, point_terms
from .family import FamilyStack, GuideFamily, regulariser
from .relaxed import GaussianQuantiser, RelaxedFamily, TemperatureSchedule
from .rr import RR
from .sq import SQ
from .terms import ElboTerms, code_indices, elbo_terms, run_traces
from .train import TrainResult, fit
from .vq import VQ

FAMILIES: dict[str, type[GuideFamily]] = {"vq": VQ, "sq": SQ, "rr": RR}

__all__ = [
    "FAMILIES",
    "RR",
    "SQ",
    "VQ",
    "Diagnostics",
    "ElboTerms",
    "FamilyStack",
    "GaussianQuantiser",
    "GuideFamily",
    "PointTerms",
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
    "regulariser",
    "run_traces",
    "save_checkpoint",
]
