"""``sq``: stochastic quantisation (Takida et al. 2022, SQ-VAE; Takida et al. 2024, HQ-VAE).

The model gains a dequantisation variable per code position, the guide a Gaussian encoder::

    model:  z_n ~ p(z_n),                z~_n ~ N(e_{z_n}, s^2 I)        site "<name>.deq"
    guide:  q(z_n = k | x) = softmax_k(-||zhat_n - e_k||^2 / (2 s^2)),
            z~_n ~ N(zhat_n, s^2 I)

so the ELBO per position has the analytic terms ``KL(q(z_n) || p(z_n))`` (``log K - H(q)`` for a
uniform prior) and ``KL(N(zhat_n, s^2) || N(e_{z_n}, s^2)) = ||zhat_n - e_{z_n}||^2 / (2 s^2)``.
The variance ``s^2`` of each site is learned, which anneals the quantiser by itself: as ``s^2``
shrinks, q sharpens towards hard VQ.

As in the authors' implementation, the categorical is evaluated at the dequantisation mean
(``z~ = zhat``) rather than at a sampled ``z~``. The guide then factorises,
``q(z, z~ | x) = q(z | x) q(z~ | x)``, so with hard codes (``family.exact()``) the analytic terms
are exact and the objective is a true ELBO (``TraceMeanField_ELBO``'s mean-field condition holds).
In training the Gaussian term is taken at the relaxed value ``sum_k w_k e_k``, which by Jensen's
inequality is smaller than its expectation over hard codes: part of the surrogate gap.

Nothing reads ``z~``: the decoder reads the code. Importance weights therefore integrate it out
(it is flagged :data:`~.family.INTEGRATES_OUT`), ``w = p(x, z) / q(z | x)``, while the ELBO keeps
its Gaussian term; an importance-weighted bound with one draw is then the code-only ELBO, which
lies above SQ's.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from probvq.codes import CodeCategorical
from probvq.sites import CodeRequest, CodeSite

from .family import INTEGRATES_OUT
from .relaxed import GaussianQuantiser


class SQ(GaussianQuantiser):
    """Gaussian stochastic quantisation with a learned variance per site.

    Args:
        sites: the model's code sites.
        init_var: initial ``s^2`` of every site.
        temperature: the Concrete temperature schedule.
        straight_through: hard forward samples with a Concrete gradient.
        claims: names of the sites this family answers.
    """

    name = "sq"

    def variance_shape(self, site: CodeSite) -> tuple[int, ...]:
        return ()

    def scale(self, site: CodeSite) -> Tensor:
        """The dequantisation standard deviation ``s`` of a site."""
        return torch.exp(0.5 * self.log_var[site.name])

    def _dequantisation(self, site: CodeSite, loc: Tensor) -> Tensor:
        noise = dist.Normal(loc, self.scale(site).expand(loc.shape))
        noise = noise.to_event(len(site.value_shape))
        return pyro.sample(f"{site.name}.deq", noise, infer={INTEGRATES_OUT: True})

    def model_site(self, request: CodeRequest) -> Tensor:
        z = super().model_site(request)
        self._dequantisation(request.site, z)
        return z

    def guide_site(self, request: CodeRequest) -> Tensor:
        site, zhat = request.site, request.features
        logits = -site.space.distances(zhat) / (2.0 * torch.exp(self.log_var[site.name]))
        q = CodeCategorical(logits, site.space, self.relaxation())
        z = pyro.sample(site.name, site.distribution(q))
        self._dequantisation(site, zhat)
        return z
