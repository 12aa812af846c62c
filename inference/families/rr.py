"""``rr``: relaxed responsibilities, our reading of relaxed-responsibility VQ (Willetts et al. 2020).

The posterior over a position's code is the E-step responsibility of a Gaussian mixture whose
mixing weights are the site's own prior ``pi_n = p(z_n)`` (uniform, learned, or top-down)::

    q(z_n = k | x) = softmax_k(log pi_nk - (D/2) log s_k^2 - ||zhat_n - e_k||^2 / (2 s_k^2))

with one learned variance ``s_k^2`` per code. The ELBO uses the analytic categorical
``KL(q(z_n) || p(z_n))`` per position, and the decoder reads a Concrete sample during training.
On a code group each depth has its own variances and mixes with its own prior, responsible for the
residual ``r_l = zhat - sum_{l' < l} v_l'`` that the values drawn above it leave.

With a uniform prior and one shared variance this is SQ's quantiser without the dequantisation
term; as every ``s_k^2 -> 0`` it becomes hard VQ. The mixing weights must be per-position prior
probabilities, so ``rr`` takes priors given as logits only: an autoregressive prior's weights depend
on codes the guide has not drawn yet, and an energy's are not available at all.
"""

from __future__ import annotations

import pyro
import torch
from torch import Tensor

from probvq.codes import CodeCategorical, normalised_logits
from probvq.priors import Prior
from probvq.sites import CodeRequest, CodeSite

from .registry import register_family
from .relaxed import GaussianQuantiser, relaxed_settings


@register_family(
    "rr",
    "relaxed responsibilities weighted by the prior, learned per-code variances",
    codebook_init="kmeans",
    **relaxed_settings(),
)
class RR(GaussianQuantiser):
    """Relaxed responsibilities with prior mixing weights and learned per-code variances.

    Args as :class:`~.relaxed.GaussianQuantiser`.
    """

    name = "rr"

    def variance_shape(self, site: CodeSite) -> tuple[int, ...]:
        return (site.num_codes,)

    def check_prior(self, site: CodeSite, prior: Prior) -> None:
        if not isinstance(prior, Tensor):
            raise ValueError(
                f"prior: the 'rr' family mixes with per-position prior probabilities; site "
                f"{site.name!r} needs its prior as logits, got a {type(prior).__name__}"
            )

    def draw(self, request: CodeRequest, depth: int, residual: Tensor) -> Tensor:
        site, prior = request.members[depth]
        log_var = self.log_var[site.name]
        dim = site.space.value_shape.numel()
        logits = (
            normalised_logits(prior)
            - 0.5 * dim * log_var
            - site.space.distances(residual) / (2.0 * torch.exp(log_var))
        )
        q = CodeCategorical(logits, site.space, self.relaxation())
        return pyro.sample(site.name, site.distribution(q))
