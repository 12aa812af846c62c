"""What relaxed families share: the Concrete relaxation and its temperature schedule.

During training the decoder reads a Concrete (Gumbel-softmax) sample, ``w = softmax((l + g) / tau)``
(Jang et al. 2017; Maddison et al. 2017), soft by default or hard-forward with a soft gradient
(straight-through Gumbel). The temperature decays as ``tau_t = max(tau_0 exp(-lambda t), tau_min)``
(Takida et al. 2022). Under :meth:`GuideFamily.exact` the same families draw exact hard codes.

Relaxed training objectives are surrogates: the decoder can read more from a soft sample than a
hard code carries, so judge such runs by the exact ELBO (``probvq.inference.evaluate``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from probvq.codes import Concrete
from probvq.sites import CodeSite

from .family import GuideFamily


@dataclass(frozen=True)
class TemperatureSchedule:
    """``tau_t = max(initial * exp(-rate * t), minimum)``."""

    initial: float = 1.0
    rate: float = 1e-4
    minimum: float = 0.1

    def __post_init__(self) -> None:
        for name in ("initial", "minimum"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"temperature {name}: must be a positive number, got {value!r}")
        if not math.isfinite(self.rate) or self.rate < 0:
            raise ValueError(f"temperature rate: must be >= 0, got {self.rate!r}")

    def __call__(self, step: int) -> float:
        return max(self.initial * math.exp(-self.rate * step), self.minimum)


class RelaxedFamily(GuideFamily):
    """Base of families whose training samples are Concrete relaxations of q."""

    def __init__(
        self,
        sites: Sequence[CodeSite],
        temperature: TemperatureSchedule | None = None,
        straight_through: bool = False,
        claims: Iterable[str] | None = None,
    ) -> None:
        super().__init__(sites, claims)
        self.schedule = temperature or TemperatureSchedule()
        self.straight_through = bool(straight_through)
        self.register_buffer("steps", torch.tensor(0))

    @property
    def temperature(self) -> float:
        return self.schedule(int(self.steps))

    def relaxation(self) -> Concrete | None:
        """The reparameterisation of the moment: none (exact codes) or Concrete at ``tau_t``."""
        if self.is_exact:
            return None
        return Concrete(self.temperature, hard=self.straight_through)

    def after_step(self) -> None:
        super().after_step()
        self.steps += 1


class GaussianQuantiser(RelaxedFamily):
    """A relaxed family whose q comes from squared distances scaled by learned variances.

    Each claimed site gets a log-variance parameter of shape :meth:`variance_shape` (a scalar for
    SQ's shared ``s^2``, one per code for RR's ``s_k^2``), initialised at ``log(init_var)``.
    """

    def __init__(
        self,
        sites: Sequence[CodeSite],
        init_var: float = 1.0,
        temperature: TemperatureSchedule | None = None,
        straight_through: bool = False,
        claims: Iterable[str] | None = None,
    ) -> None:
        super().__init__(sites, temperature, straight_through, claims)
        if not init_var > 0:
            raise ValueError(f"init_var: the initial variance must be positive, got {init_var!r}")
        self.log_var = nn.ParameterDict(
            {
                name: nn.Parameter(torch.full(self.variance_shape(site), math.log(init_var)))
                for name, site in self.sites.items()
            }
        )

    def variance_shape(self, site: CodeSite) -> tuple[int, ...]:
        raise NotImplementedError
