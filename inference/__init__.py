"""Guide families, objectives, training, evaluation and checkpoints (``probvq.inference``)."""

from .checkpoint import RunDir, load_checkpoint, save_checkpoint
from .evaluate import evaluate
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
    "ElboTerms",
    "FamilyStack",
    "GaussianQuantiser",
    "GuideFamily",
    "RelaxedFamily",
    "RunDir",
    "TemperatureSchedule",
    "TrainResult",
    "code_indices",
    "elbo_terms",
    "evaluate",
    "fit",
    "load_checkpoint",
    "regulariser",
    "run_traces",
    "save_checkpoint",
]
