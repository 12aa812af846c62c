"""``vq``: hard vector quantisation (van den Oord et al. 2017, "Neural Discrete Representation
Learning").

Per position n of a site with encoder feature ``zhat_n`` and codebook ``e_1..e_K``::

    q(z_n = k | x) = 1[k = argmin_j ||zhat_n - e_j||^2]           a point mass
    decoder input  = zhat_n + sg(e_k - zhat_n)                       straight-through
    KL(q || p)     = -log p(z_n = k)                                  log K for a uniform prior

The ELBO is ``log p(x | z) - sum_n KL``; its encoder gradient is the straight-through estimate.
Training adds the codebook and commitment terms ``||sg(zhat) - e||^2 + beta ||zhat - sg(e)||^2``
as a regulariser outside the ELBO, or, with ``ema=True``, only the commitment term while the codebook
follows exponential moving averages of its cluster means (Laplace-smoothed counts; see
:class:`probvq.Codebook`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyro
from torch import Tensor

from probvq.codes import CodePoint
from probvq.sites import CodeRequest, CodeSite

from .family import GuideFamily, regulariser, squared_error


class VQ(GuideFamily):
    """Hard VQ with a straight-through gradient.

    Args:
        sites: the model's code sites.
        beta: commitment weight (0.25 in the paper).
        ema: learn the codebook by EMA instead of the codebook loss.
        decay: EMA decay (0.99).
        claims: names of the sites this family answers.
    """

    name = "vq"

    def __init__(
        self,
        sites: Sequence[CodeSite],
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        claims: Iterable[str] | None = None,
    ) -> None:
        super().__init__(sites, claims)
        if beta < 0:
            raise ValueError(f"beta: the commitment weight must be >= 0, got {beta!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: the EMA decay must lie in (0, 1), got {decay!r}")
        self.beta = float(beta)
        self.ema = bool(ema)
        self.decay = float(decay)

    @property
    def ema_decay(self) -> float | None:
        return self.decay if self.ema else None

    def guide_site(self, request: CodeRequest) -> Tensor:
        site, zhat = request.site, request.features
        index = site.space.nearest(zhat)
        anchor = None if self.is_exact else zhat
        value = pyro.sample(site.name, site.distribution(CodePoint(index, site.space, anchor)))
        code = site.space.embed_index(index)
        event_dims = len(site.value_shape)
        penalty = self.beta * squared_error(zhat, code.detach(), event_dims)
        if not self.ema:
            penalty = penalty + squared_error(zhat.detach(), code, event_dims)
        regulariser(f"{site.name}.vq", penalty)
        return value
