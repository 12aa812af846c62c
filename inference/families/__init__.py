"""Guide families, one file each, and their registry (``probvq.inference.families``)."""

from .base import FamilyMessenger, FamilyStack, GuideFamily, squared_error
from .bernoulli import RelaxedBernoulli
from .enum import Enum, EnumELBO
from .gumbel import Gumbel
from .registry import FAMILIES, FamilySpec, Setting, register_family
from .relaxed import GaussianQuantiser, RelaxedFamily, TemperatureSchedule
from .rr import RR
from .score import Score
from .sq import SQ
from .vq import VQ

__all__ = [
    "FAMILIES",
    "RR",
    "SQ",
    "VQ",
    "Enum",
    "EnumELBO",
    "FamilyMessenger",
    "FamilySpec",
    "FamilyStack",
    "GaussianQuantiser",
    "GuideFamily",
    "Gumbel",
    "RelaxedBernoulli",
    "RelaxedFamily",
    "Score",
    "Setting",
    "TemperatureSchedule",
    "register_family",
    "squared_error",
]
