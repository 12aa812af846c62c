"""``rr``: relaxed responsibilities, our reading of relaxed-responsibility VQ (Willetts et al. 2020).

The posterior over a position's code is the E-step responsibility of a Gaussian mixture whose
mixing weights are the site's own prior ``pi_n = p(z_n)`` (uniform, learned, or top-down)::

    q(z_n = k | x) = softmax_k(log pi_nk - (D/2) log s_k^2 - ||zhat_n - e_k||^2 / (2 s_k^2))

with one learned variance ``s_k^2`` per code. The ELBO uses the analytic categorical
``KL(q(z_n) || p(z_n))`` per position, and the decoder reads a Concrete sample during training.

With a uniform prior and one shared variance this is SQ's quantiser without the dequantisation
term; as every ``s_k^2 -> 0`` it becomes hard VQ.
"""

from __future__ import annotations

import pyro
import torch
from torch import Tensor

from probvq.codes import CodeCategorical, normalised_logits
from probvq.sites import CodeRequest, CodeSite

from .relaxed import GaussianQuantiser


class RR(GaussianQuantiser):
    """Relaxed responsibilities with prior mixing weights and learned per-code variances.

    Args:
        sites: the model's code sites.
        init_var: initial ``s_k^2`` of every code.
        temperature: the Concrete temperature schedule.
        straight_through: hard forward samples with a Concrete gradient.
        claims: names of the sites this family answers.
    """

    name = "rr"

    def variance_shape(self, site: CodeSite) -> tuple[int, ...]:
        return (site.num_codes,)

    def guide_site(self, request: CodeRequest) -> Tensor:
        site, zhat = request.site, request.features
        if not isinstance(request.prior, Tensor):
            raise ValueError(
                f"prior: the 'rr' family mixes with per-position prior probabilities; site "
                f"{site.name!r} needs its prior as logits, got a {type(request.prior).__name__}"
            )
        log_var = self.log_var[site.name]
        dim = site.space.value_shape.numel()
        logits = (
            normalised_logits(request.prior)
            - 0.5 * dim * log_var
            - site.space.distances(zhat) / (2.0 * torch.exp(log_var))
        )
        q = CodeCategorical(logits, site.space, self.relaxation())
        return pyro.sample(site.name, site.distribution(q))
