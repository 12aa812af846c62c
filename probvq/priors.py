"""Priors of a code site beyond plain logits: autoregressive priors and energies.

A code site's prior is one of three kinds (:data:`Prior`):

* **logits** ``(*batch, *grid, K)``: independent categoricals per position (uniform, learned, or
  computed top-down from other sites);
* an :class:`AutoregressivePrior`: given the site's value it returns, in one teacher-forced pass,
  the conditional logits ``log p(z_n = k | z_<n)`` of every position (what a PixelCNN is). The
  positions are ordered row-major over the grid, and the prior must be causal in that order;
* an :class:`EnergyPrior`: an unnormalised log-density ``p(z) = exp(-F(z)) / Z`` over the whole grid
  (e.g. an RBM's free energy over binary units), with ``log Z`` supplied apart.

On the model side these become :class:`AutoregressiveCodes` and :class:`EnergyCodes`, distributions
over a site's codes whose ``log_prob`` is exact (teacher-forced, or ``-F(z) - log Z``). The rate a
guide family pays against them is :func:`probvq.rates.rate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor, nn
from torch.distributions import constraints

from probvq.codes import gumbel_like
from probvq.spaces import CodeSpace


class AutoregressivePrior(nn.Module):
    """Base of autoregressive priors over a code grid: subclass and define :meth:`conditional_logits`.

    Positions are ordered row-major over the grid; ``conditional_logits`` must be causal in that
    order (the logits at position n read only positions before n), which is what makes one pass
    give every conditional ``p(z_n | z_<n)`` (teacher forcing).
    """

    def conditional_logits(self, value: Tensor) -> Tensor:
        """Logits ``(*batch, *grid, K)`` of ``p(z_n | z_<n)`` from values ``(*batch, *grid, ...)``.

        ``value`` is what the site's program reads: code embeddings (or unit states) for hard
        codes, their relaxed mixtures during relaxed training.
        """
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class EnergyPrior:
    """``p(z) = exp(-energy(z)) / Z`` over a whole code grid, with ``log_normaliser = log Z``.

    ``energy`` maps values ``(*batch, *grid, *value_shape)`` to ``(*batch)``. ``log_normaliser``
    is supplied apart because no family can compute it: an exact value on small spaces, an
    estimate (e.g. AIS) with a surrogate gradient (e.g. from persistent chains) otherwise.
    ``sample``, if given, draws codes ``(*batch_shape, *grid, *code_shape)`` from the prior (e.g. by
    Gibbs sampling); without it the prior cannot be sampled ancestrally.
    """

    energy: Callable[[Tensor], Tensor]
    log_normaliser: Tensor | float
    sample: Callable[[torch.Size], Tensor] | None = None


Prior = Tensor | AutoregressivePrior | EnergyPrior
"""What a code site's prior may be: logits, an autoregressive prior, or an energy."""


class _GridCodes(TorchDistribution):
    """A distribution over the codes of a whole grid (one event per batch element) under ``prior``."""

    arg_constraints: dict = {}

    def __init__(
        self,
        prior: AutoregressivePrior | EnergyPrior,
        space: CodeSpace,
        grid: tuple[int, ...],
        batch_shape: torch.Size = torch.Size(),
    ) -> None:
        self.prior = prior
        self.space = space
        self.grid = tuple(grid)
        event_shape = torch.Size(grid) + space.code_shape
        super().__init__(torch.Size(batch_shape), event_shape, validate_args=False)

    def expand(self, batch_shape: torch.Size, _instance=None) -> _GridCodes:
        return type(self)(self.prior, self.space, self.grid, torch.Size(batch_shape))

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(self.space.support, len(self.grid))

    def _grid_sum(self, per_position: Tensor) -> Tensor:
        return per_position.sum(tuple(range(-len(self.grid), 0)))


class AutoregressiveCodes(_GridCodes):
    """The model-side distribution of a site under an :class:`AutoregressivePrior`.

    ``log_prob`` is ``sum_n log p(z_n | z_<n)`` in one teacher-forced pass; ``sample`` draws the
    positions one after another (row-major), one pass of the prior each.
    """

    def conditional_logits(self, code: Tensor) -> Tensor:
        """The prior's per-position logits at ``code``, checked for shape."""
        value = self.space.value_of(code)
        logits = self.prior.conditional_logits(value)
        expected = (*code.shape[: code.dim() - len(self.event_shape)], *self.grid, self.space.num_codes)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"prior: {type(self.prior).__name__}.conditional_logits returned "
                f"{tuple(logits.shape)}, expected {expected} (batch, grid, K)"
            )
        return logits

    def log_prob(self, value: Tensor) -> Tensor:
        log_probs = torch.log_softmax(self.conditional_logits(value), -1)
        index = self.space.index_of(value)
        return self._grid_sum(log_probs.gather(-1, index.unsqueeze(-1)).squeeze(-1))

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape + torch.Size(self.grid)
        index = torch.zeros(shape, dtype=torch.long, device=self.space.like.device)
        with torch.no_grad():
            code = self.space.code_of_index(index)
            flat = index.view(*shape[: -len(self.grid)], -1)
            for n in range(flat.shape[-1]):
                logits = self.conditional_logits(code).flatten(-1 - len(self.grid), -2)[..., n, :]
                flat[..., n] = (logits + gumbel_like(logits)).argmax(-1)
                code = self.space.code_of_index(index)
        return code


class EnergyCodes(_GridCodes):
    """The model-side distribution of a site under an :class:`EnergyPrior`:
    ``log_prob(z) = -F(z) - log Z``."""

    def energy(self, code: Tensor) -> Tensor:
        """``F`` at ``code``, checked for shape."""
        energy = self.prior.energy(self.space.value_of(code))
        expected = tuple(code.shape[: code.dim() - len(self.event_shape)])
        if tuple(energy.shape) != expected:
            raise ValueError(
                f"prior: the energy returned {tuple(energy.shape)}, expected {expected} (one per "
                "batch element)"
            )
        return energy

    @property
    def log_normaliser(self) -> Tensor | float:
        return self.prior.log_normaliser

    def log_prob(self, value: Tensor) -> Tensor:
        return -self.energy(value) - self.log_normaliser

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        if self.prior.sample is None:
            raise NotImplementedError(
                "prior: this EnergyPrior has no sampler; give EnergyPrior(sample=...) (e.g. a Gibbs "
                "sampler) to draw from it"
            )
        return self.prior.sample(torch.Size(sample_shape) + self.batch_shape)
