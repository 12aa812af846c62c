"""The rate of a latent site: what a guide sample pays against its prior, with correct gradients.

For a latent with guide ``q`` and prior ``p``, the ELBO's term is ``-KL(q || p)``. :func:`rate` gives a
per-sample estimate of ``KL(q || p)`` whose expectation and gradient are those of the family's
objective. ``code`` is the guide's sample (the value the model also read):

==============================  ===========================================================  ==========
prior ``p``                     rate                                                         estimate
==============================  ===========================================================  ==========
logits (independent positions)  ``sum_n KL(q_n || p_n)``, analytic                          exact
:class:`AutoregressiveCodes`    ``sum_n KL(q_n || p_n(. | z_<n))`` with the context ``z_<n``  unbiased
                                read from ``code`` (teacher forcing)
:class:`EnergyCodes`            ``-H(q) + F(z) + log Z``: the entropy analytic, the energy    unbiased
                                at ``code``
==============================  ===========================================================  ==========

For a point-mass guide (:class:`~probvq.codes.CodePoint`, hard VQ) ``KL_n = -log p_n(k_n | ...)``
and ``H = 0``. "Unbiased" is with respect to the draw of ``code``: with exact hard codes the mean
rate is the true ``KL(q || p)`` (``E_q[F] + log Z - H(q)`` for an energy, the chain rule of KL for
an autoregressive prior); with relaxed codes it is the relaxed objective, the same expression at the
relaxed value, and its pathwise gradient is that objective's gradient, through ``q``'s logits and
through the context or the energy alike.

A code guide against a prior of any other kind has no rate that keeps the KL's gradient
(``log q(k) - log p(k)`` is piecewise constant in a relaxed value), so :func:`rate` refuses it
rather than fall back silently. Latents that are not codes (e.g. SQ's Gaussian dequantisation) use
a registered analytic KL, or ``log q - log p`` at the sample, which is correct for reparameterised
densities.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Distribution, Independent, kl_divergence

from probvq.codes import CodeCategorical, CodePoint, categorical_kl
from probvq.priors import AutoregressiveCodes, EnergyCodes

CodeGuide = CodeCategorical | CodePoint


def unwrap(fn: Distribution) -> tuple[Distribution, int]:
    """The base of nested ``Independent`` wrappers and how many batch dims they made events."""
    dims = 0
    while isinstance(fn, Independent):
        dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, dims


def _sum_last(value: Tensor, dims: int) -> Tensor:
    return value.sum(tuple(range(-dims, 0))) if dims else value


def rate(q: Distribution, p: Distribution, code: Tensor) -> Tensor:
    """A per-sample estimate of ``KL(q || p)`` at the guide's sample ``code``, shaped like q's batch."""
    base, dims = unwrap(q)
    if not isinstance(base, CodeGuide):
        try:
            return kl_divergence(q, p)
        except NotImplementedError:
            return q.log_prob(code) - p.log_prob(code)
    prior, _ = unwrap(p)
    if isinstance(prior, CodeCategorical):
        return kl_divergence(q, p)
    if isinstance(prior, AutoregressiveCodes):
        logits = prior.conditional_logits(code)
        if isinstance(base, CodePoint):
            per_position = -logits.log_softmax(-1).gather(-1, base.index.unsqueeze(-1)).squeeze(-1)
        else:
            per_position = categorical_kl(base.logits, logits)
        return _sum_last(per_position, dims)
    if isinstance(prior, EnergyCodes):
        entropy = _sum_last(base.entropy(), dims)
        return -entropy + prior.energy(code) + prior.log_normaliser
    raise NotImplementedError(
        f"no rate keeps the gradient of KL({type(base).__name__} || {type(prior).__name__}); give "
        "the prior as logits, an AutoregressivePrior or an EnergyPrior"
    )
