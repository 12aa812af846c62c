"""Distributions over the codes of a :class:`~probvq.spaces.CodeSpace`.

Both distributions are categorical over K codes at each position; their samples are *codes* (what
the code stands for, with its index: see :mod:`probvq.spaces`). They fix three Pyro sharp edges by
construction:

* ``log_prob`` is the exact categorical log-probability of the code a sample names, never a relaxed
  density (``RelaxedOneHotCategoricalStraightThrough`` scores the relaxed sample instead), and a
  pure function of the code;
* the support is the space's codes, so a relaxed code passes Pyro's validation at a model site
  (``OneHotCategorical`` rejects it);
* ``KL(q || p)`` is registered analytically against a categorical prior over the same space, so
  Pyro's ``TraceMeanField_ELBO`` and probvq's rates use the exact per-position KL.

How ``rsample`` reparameterises is the family's choice, passed as a rule:

* :class:`StraightThrough` ``(anchor)``: the hard code's value with the gradient of ``anchor``,
  ``v = a + sg(e_k - a)`` (van den Oord et al. 2017 use the encoder output as anchor);
* :class:`Concrete` ``(tau, hard)``: Gumbel-softmax weights ``w = softmax((l + g) / tau)``
  (Jang et al. 2017; Maddison et al. 2017), ``v = sum_k w_k e_k``; with ``hard`` the forward value
  is the hard code and the gradient that of ``w``;
* :class:`Embedded` ``()``: the exact code ``e_k``, with the table's gradient and none to the logits
  (score-function families).

Either way the code behind a relaxed value is ``argmax_k (l_k + g_k)``, an exact draw from the
categorical (the Gumbel-max trick), and the sample carries that index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints, register_kl

from probvq.spaces import CodeSpace


@dataclass(frozen=True)
class StraightThrough:
    """Reparameterise as ``anchor + sg(e_k - anchor)``; ``anchor`` has the value's shape."""

    anchor: Tensor


@dataclass(frozen=True)
class Concrete:
    """Reparameterise with Gumbel-softmax weights at ``temperature``; ``hard`` for ST-Gumbel."""

    temperature: float
    hard: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature: must be a positive number, got {self.temperature!r}")


@dataclass(frozen=True)
class Embedded:
    """No reparameterisation of q: the exact code, whose value ``e_k`` is read with the gradient of
    the code space's table (what score-function families train the codebook by)."""


ReparamRule = StraightThrough | Concrete | Embedded


def broadcast_base(logits: Tensor) -> Tensor:
    """``logits`` without its leading broadcast (stride-0) dimensions: the numbers actually held."""
    base = logits
    while base.dim() > 1 and base.stride(0) == 0:
        base = base[0]
    return base


def normalised_logits(logits: Tensor) -> Tensor:
    """``log_softmax`` over the last dimension, computed once for logits broadcast over positions.

    A uniform or shared prior is an expanded view of fewer numbers; normalising the view would
    allocate the full table, normalising its base does not.
    """
    return torch.log_softmax(broadcast_base(logits), -1).expand(logits.shape)


def gumbel_like(logits: Tensor) -> Tensor:
    """Standard Gumbel noise ``-log E``, ``E = -log U ~ Exp(1)``, ``U ~ Uniform(0, 1)``.

    Inverting a uniform is five times faster on the CPU than ``Tensor.exponential_`` (a sequential
    sampler there), which took 60 % of a 32-layer model's training step.
    """
    tiny = torch.finfo(logits.dtype).tiny
    exponential = torch.rand_like(logits).clamp_min(tiny).log().neg().clamp_min(tiny)
    return -exponential.log()


class CodeCategorical(TorchDistribution):
    """Categorical over a space's codes at each position, with logits ``(..., K)``.

    Samples are codes of shape ``batch_shape + space.code_shape``; ``rule`` (a :data:`ReparamRule`)
    makes it reparameterisable, without one it samples exactly and has no ``rsample``.
    """

    # Logits may be -inf (impossible codes); validation rejects NaN only, and checks the numbers
    # held rather than their broadcast view (a uniform prior is K numbers, not N x K).
    arg_constraints: dict = {}

    def __init__(
        self,
        logits: Tensor,
        space: CodeSpace,
        rule: ReparamRule | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if logits.shape[-1:] != (space.num_codes,):
            raise ValueError(
                f"logits: expected a last dimension of K={space.num_codes}, got {tuple(logits.shape)}"
            )
        self.logits = logits
        self.space = space
        self.rule = rule
        super().__init__(logits.shape[:-1], space.code_shape, validate_args=validate_args)
        if self._validate_args and torch.isnan(broadcast_base(logits)).any():
            raise ValueError("logits: the code logits contain NaN")

    @property
    def support(self) -> constraints.Constraint:
        return self.space.support

    @property
    def has_rsample(self) -> bool:
        return self.rule is not None

    @property
    def log_probs(self) -> Tensor:
        return normalised_logits(self.logits)

    def expand(self, batch_shape: torch.Size, _instance=None) -> CodeCategorical:
        batch_shape = torch.Size(batch_shape)
        rule = self.rule
        if isinstance(rule, StraightThrough):
            rule = StraightThrough(rule.anchor.expand(batch_shape + self.space.value_shape))
        logits = self.logits.expand((*batch_shape, self.space.num_codes))
        return CodeCategorical(logits, self.space, rule, validate_args=False)

    def _draw(self, sample_shape: torch.Size) -> tuple[Tensor, Tensor]:
        perturbed = self.logits.expand(sample_shape + self.logits.shape) + gumbel_like(
            self.logits.expand(sample_shape + self.logits.shape)
        )
        return perturbed, perturbed.argmax(-1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            _, index = self._draw(torch.Size(sample_shape))
            return self.space.code_of_index(index)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        if self.rule is None:
            raise NotImplementedError("this code distribution was built without a reparam rule")
        perturbed, index = self._draw(torch.Size(sample_shape))
        if isinstance(self.rule, Embedded):
            value = self.space.embed_index(index)
        elif isinstance(self.rule, StraightThrough):
            anchor = self.rule.anchor
            value = anchor + (self.space.embed_index(index) - anchor).detach()
        else:
            weights = torch.softmax(perturbed / self.rule.temperature, -1)
            if self.rule.hard:
                one_hot = torch.nn.functional.one_hot(index, self.space.num_codes).to(weights)
                weights = one_hot + (weights - weights.detach())
            value = self.space.embed(weights)
        return self.space.to_code(value, index)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        index = self.space.index_of(value)
        log_probs = self.log_probs.expand((*index.shape, self.space.num_codes))
        return log_probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> Tensor:
        log_probs = self.log_probs
        return -_expectation(log_probs.exp(), log_probs)


class CodePoint(TorchDistribution):
    """A point mass on code ``index`` at each position: hard vector quantisation's posterior.

    Stored as indices rather than logits, so even K = 65,536 codes cost nothing per position.
    ``anchor`` gives the straight-through ``rsample`` (``anchor + sg(e_k - anchor)``); without it
    ``rsample`` is the plain code, a value no parameter moves (the residual depths of a code group).
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        index: Tensor,
        space: CodeSpace,
        anchor: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self.index = index
        self.space = space
        self.anchor = anchor
        super().__init__(index.shape, space.code_shape, validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return self.space.support

    has_rsample = True

    def expand(self, batch_shape: torch.Size, _instance=None) -> CodePoint:
        batch_shape = torch.Size(batch_shape)
        anchor = self.anchor
        if anchor is not None:
            anchor = anchor.expand(batch_shape + self.space.value_shape)
        return CodePoint(self.index.expand(batch_shape), self.space, anchor, validate_args=False)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.space.code_of_index(
                self.index.expand(torch.Size(sample_shape) + self.index.shape)
            )

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        index = self.index.expand(torch.Size(sample_shape) + self.index.shape)
        hard = self.space.embed_index(index)
        if self.anchor is None:
            return self.space.to_code(hard.detach(), index)
        return self.space.to_code(self.anchor + (hard - self.anchor).detach(), index)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        hit = self.space.index_of(value) == self.index
        return torch.zeros(hit.shape, device=hit.device).masked_fill(~hit, -torch.inf)

    def entropy(self) -> Tensor:
        return torch.zeros(self.batch_shape, device=self.index.device)


def _expectation(probs: Tensor, values: Tensor) -> Tensor:
    """``sum_k p_k v_k`` with ``0 * v = 0`` even for infinite ``v`` (``0 log 0 = 0``).

    The mask is applied to ``v`` before the product, so neither the value nor its gradient meets
    ``0 * inf``.
    """
    return (probs * torch.where(probs > 0, values, torch.zeros_like(values))).sum(-1)


def _check_same_space(q: CodeCategorical | CodePoint, p: CodeCategorical) -> None:
    if q.space.num_codes != p.space.num_codes:
        raise ValueError(
            f"KL between code distributions over K={q.space.num_codes} and K={p.space.num_codes}"
        )


def categorical_kl(q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """``sum_k q_k (log q_k - log p_k)`` from logits ``(..., K)``; codes q rules out add nothing."""
    log_q = normalised_logits(q_logits)
    return _expectation(log_q.exp(), log_q - normalised_logits(p_logits))


@register_kl(CodeCategorical, CodeCategorical)
def _kl_categorical_categorical(q: CodeCategorical, p: CodeCategorical) -> Tensor:
    """``sum_k q_k (log q_k - log p_k)`` per position."""
    _check_same_space(q, p)
    return categorical_kl(q.logits, p.logits)


@register_kl(CodePoint, CodeCategorical)
def _kl_point_categorical(q: CodePoint, p: CodeCategorical) -> Tensor:
    """``-log p(k*)``: a point mass's KL is the prior's surprise at the chosen code."""
    _check_same_space(q, p)
    log_p = p.log_probs.expand((*q.index.shape, p.space.num_codes))
    return -log_p.gather(-1, q.index.unsqueeze(-1)).squeeze(-1)
