"""What relaxed families share: the Concrete relaxation and its temperature schedule.

During training the decoder reads a Concrete (Gumbel-softmax) sample, ``w = softmax((l + g) / tau)``
(Jang et al. 2017; Maddison et al. 2017), soft by default or hard-forward with a soft gradient
(straight-through Gumbel). The temperature decays as ``tau_t = max(tau_0 exp(-lambda t), tau_min)``
(Takida et al. 2022), with ``lambda`` given per step or chosen so that ``tau_min`` is reached after a
fraction of the run (``lambda = log(tau_0 / tau_min) / (fraction * total_steps)``; the run's length
arrives through the ``before_run`` hook, see :mod:`probvq.hooks`). Under
:meth:`~.base.GuideFamily.exact` the same families draw exact hard codes.

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

from .base import GuideFamily
from .registry import Setting


@dataclass(frozen=True)
class TemperatureSchedule:
    """``tau_t = max(initial * exp(-lambda * t), minimum)``.

    ``lambda`` is ``rate`` per step, or, with ``fraction``, ``log(initial / minimum)`` spread over
    that fraction of the run's ``total_steps``.
    """

    initial: float = 1.0
    minimum: float = 0.5
    rate: float | None = None
    fraction: float | None = 0.5

    def __post_init__(self) -> None:
        for name in ("initial", "minimum"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"temperature {name}: must be a positive number, got {value!r}")
        if self.minimum > self.initial:
            raise ValueError(
                f"temperature minimum: {self.minimum} is above the initial temperature "
                f"{self.initial}; the schedule only decays"
            )
        if (self.rate is None) == (self.fraction is None):
            raise ValueError("anneal: give either a rate per step or a fraction of the run, not both")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"anneal rate: must be a non-negative number, got {self.rate!r}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"anneal fraction: must lie in (0, 1], got {self.fraction!r}")

    @property
    def relative(self) -> bool:
        return self.fraction is not None

    def decay(self, total_steps: int) -> float:
        """``lambda`` for a run of ``total_steps``."""
        if self.fraction is None:
            return float(self.rate)
        return math.log(self.initial / self.minimum) / (self.fraction * total_steps)

    def check_length(self, total_steps: int) -> None:
        """Refuse to step a relative schedule that does not know the run's length."""
        if self.relative and total_steps < 1:
            raise ValueError(
                "temperature: this schedule is relative to the run's length, which nobody gave: "
                "call probvq.before_run(total_steps, vae, family) before training (fit does)"
            )

    def __call__(self, step: int, total_steps: int = 0) -> float:
        if step == 0:
            return self.initial
        self.check_length(total_steps)
        return max(self.initial * math.exp(-self.decay(total_steps) * step), self.minimum)


class RelaxedFamily(GuideFamily):
    """Base of families whose training samples are Concrete relaxations of q.

    Args:
        sites: the model's code sites.
        temperature: initial Concrete temperature ``tau_0``.
        temperature_min: the floor ``tau_min``.
        anneal_fraction: reach ``tau_min`` after this fraction of the run (relative schedule), or
        anneal_rate: decay ``lambda`` per step (give one of the two).
        straight_through: hard forward samples with a Concrete gradient.
        claims: names of the sites this family answers.
    """

    def __init__(
        self,
        sites: Sequence[CodeSite],
        temperature: float = 1.0,
        temperature_min: float = 0.5,
        anneal_fraction: float | None = 0.5,
        anneal_rate: float | None = None,
        straight_through: bool = True,
        claims: Iterable[str] | None = None,
    ) -> None:
        super().__init__(sites, claims)
        fraction = None if anneal_rate is not None else anneal_fraction
        self.schedule = TemperatureSchedule(temperature, temperature_min, anneal_rate, fraction)
        self.straight_through = bool(straight_through)
        self.register_buffer("steps", torch.tensor(0))
        self.register_buffer("total_steps", torch.tensor(0))

    @property
    def temperature(self) -> float:
        return self.schedule(int(self.steps), int(self.total_steps))

    def relaxation(self) -> Concrete | None:
        """The reparameterisation of the moment: none (exact codes) or Concrete at ``tau_t``."""
        if self.is_exact:
            return None
        return Concrete(self.temperature, hard=self.straight_through)

    def before_run(self, total_steps: int) -> None:
        """Learn the run's length (a relative schedule spreads its decay over it)."""
        self.total_steps.fill_(total_steps)

    def after_step(self) -> None:
        super().after_step()
        self.schedule.check_length(int(self.total_steps))
        self.steps += 1


class GaussianQuantiser(RelaxedFamily):
    """A relaxed family whose q comes from squared distances scaled by learned variances.

    Each claimed site gets a log-variance parameter of shape :meth:`variance_shape` (a scalar for
    SQ's shared ``s^2``, one per code for RR's ``s_k^2``), initialised at ``log(init_var)``.
    Other arguments as :class:`RelaxedFamily`.
    """

    def __init__(self, sites: Sequence[CodeSite], init_var: float = 1.0, **relaxed) -> None:
        super().__init__(sites, **relaxed)
        if not (math.isfinite(init_var) and init_var > 0):
            raise ValueError(f"init_var: the initial variance must be positive, got {init_var!r}")
        self.log_var = nn.ParameterDict(
            {
                name: nn.Parameter(torch.full(self.variance_shape(site), math.log(init_var)))
                for name, site in self.sites.items()
            }
        )

    def variance_shape(self, site: CodeSite) -> tuple[int, ...]:
        raise NotImplementedError


def relaxed_settings() -> dict[str, Setting]:
    """The registry settings of a Gaussian quantiser (defaults come from its constructor)."""
    return {"init_var": Setting("initial quantisation variance s^2"), **concrete_settings()}


def concrete_settings() -> dict[str, Setting]:
    """The registry settings of any :class:`RelaxedFamily`: its temperature schedule and mode."""
    return {
        "temperature": Setting("initial Concrete temperature tau_0"),
        "temperature_min": Setting("smallest Concrete temperature tau_min"),
        "anneal_fraction": Setting("reach tau_min after this fraction of the run"),
        "anneal_rate": Setting("decay per step instead (tau_t = tau_0 exp(-rate t))", float),
        "straight_through": Setting("hard forward samples with a Concrete gradient"),
    }
