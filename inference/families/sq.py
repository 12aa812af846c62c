"""``sq``: stochastic quantisation (Takida et al. 2022, SQ-VAE; Takida et al. 2024, HQ-VAE).

The model gains a dequantisation variable, the guide a Gaussian encoder::

    model:  z_n ~ p(z_n),                z~_n ~ N(e_{z_n}, s^2 I)        site "<name>.deq"
    guide:  q(z_n = k | x) = softmax_k(-||zhat_n - e_k||^2 / (2 s^2)),
            z~_n ~ N(zhat_n, s^2 I)

so the ELBO per position has the analytic terms ``KL(q(z_n) || p(z_n))`` (``log K - H(q)`` for a
uniform prior) and ``KL(N(zhat_n, s^2) || N(e_{z_n}, s^2)) = ||zhat_n - e_{z_n}||^2 / (2 s^2)``.
The variance ``s^2`` of each site is learned, which anneals the quantiser by itself: as ``s^2``
shrinks, q sharpens towards hard VQ.

On a code group (RSQ-VAE, HQ-VAE's residual layers) depth l has its own variance ``s_l^2`` and
quantises the residual left by the values drawn above it, ``r_l = zhat - sum_{l' < l} v_l'``, and one
dequantisation variable sits on the sum: ``z~ ~ N(sum_l e_{z_l}, s_L^2 I)`` in the model,
``N(zhat, s_L^2 I)`` in the guide (``s_L^2``: the last depth's variance).

As in the authors' implementation, the categorical is evaluated at the dequantisation mean
(``z~ = zhat``) rather than at a sampled ``z~``, so ``z~`` and the codes are independent under the
guide; with hard codes (``family.exact()``) the analytic terms are exact and the objective is a true
ELBO. In training the Gaussian term is taken at the relaxed value ``sum_k w_k e_k``, which by
Jensen's inequality is smaller than its expectation over hard codes: part of the surrogate gap.

Nothing reads ``z~``: the decoder reads the codes. Importance weights therefore integrate it out
(it is flagged :data:`~probvq.factors.INTEGRATES_OUT`), ``w = p(x, z) / q(z | x)``, while the ELBO
keeps its Gaussian term; an importance-weighted bound with one draw is then the code-only ELBO,
which lies above SQ's.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from probvq.codes import CodeCategorical
from probvq.factors import INTEGRATES_OUT
from probvq.sites import CodeRequest, CodeSite

from .registry import register_family
from .relaxed import GaussianQuantiser, relaxed_settings


@register_family(
    "sq",
    "stochastic quantisation with a learned variance (SQ-VAE; RSQ-VAE on code groups)",
    codebook_init="normal",
    **relaxed_settings(),
)
class SQ(GaussianQuantiser):
    """Gaussian stochastic quantisation with a learned variance per site (see the module).

    Args as :class:`~.relaxed.GaussianQuantiser`.
    """

    name = "sq"

    def variance_shape(self, site: CodeSite) -> tuple[int, ...]:
        return ()

    def scale(self, site: CodeSite) -> Tensor:
        """The dequantisation standard deviation ``s`` of a site."""
        return torch.exp(0.5 * self.log_var[site.name])

    def _dequantisation(self, request: CodeRequest, loc: Tensor) -> None:
        last = request.sites[-1]
        noise = dist.Normal(loc, self.scale(last).expand(loc.shape))
        noise = noise.to_event(len(last.value_shape))
        pyro.sample(f"{request.name}.deq", noise, infer={INTEGRATES_OUT: True})

    def model_codes(self, request: CodeRequest) -> list[Tensor]:
        codes = super().model_codes(request)
        self._dequantisation(request, request.value(codes))
        return codes

    def guide_codes(self, request: CodeRequest) -> list[Tensor]:
        codes = super().guide_codes(request)
        self._dequantisation(request, request.features)
        return codes

    def draw(self, request: CodeRequest, depth: int, residual: Tensor) -> Tensor:
        site = request.sites[depth]
        logits = -site.space.distances(residual) / (2.0 * torch.exp(self.log_var[site.name]))
        q = CodeCategorical(logits, site.space, self.relaxation())
        return pyro.sample(site.name, site.distribution(q))
