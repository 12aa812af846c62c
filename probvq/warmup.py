"""KL warm-up: the rate weighted by ``beta_t`` rising from 0 to 1 (an effect handler).

Deep hierarchies of latents tend to switch their upper layers off early, when the prior's pull is
strong and the decoder has not learned to use them yet. Warm-up trains on::

    -E_q[log p(x | z)] + beta_t * KL(q(z | x) || p(z)),   beta_t = min(1, t / T)

for the first ``T`` steps (Bowman et al. 2016; Sonderby et al. 2016, Ladder VAE; NVAE). It is a
training device only: the bounds that evaluation reports always have ``beta = 1``.

:class:`RateScale` works like ``poutine.scale``, but only on the sites that make up a rate: every
latent sample site, and every model factor flagged as part of a latent's prior
(:data:`~probvq.factors.RATE_OF`). Observed data and training-only regularisers (VQ's commitment
loss) keep their weight.
"""

from __future__ import annotations

import math

from pyro.poutine.messenger import Messenger

from probvq.factors import RATE_OF


def warmup_weight(step: int, warmup_steps: int) -> float:
    """``beta_t = min(1, t / T)``; 1 when ``warmup_steps`` is 0 (no warm-up)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected a non-negative number of steps, got {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


class RateScale(Messenger):
    """Multiply the scale of every rate site by :attr:`beta` (set it between steps)."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"beta: expected a non-negative weight of the rate, got {value!r}")
        self._beta = float(value)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or self._beta == 1.0:
            return
        if not msg["is_observed"] or (msg["infer"] or {}).get(RATE_OF) is not None:
            msg["scale"] = self._beta * msg["scale"]
