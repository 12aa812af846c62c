"""``vq``: hard vector quantisation (van den Oord et al. 2017, "Neural Discrete Representation
Learning"), and residual quantisation over a code group (Lee et al. 2022, RQ-VAE).

Per position n of a site with encoder feature ``zhat_n`` and codebook ``e_1..e_K``::

    q(z_n = k | x) = 1[k = argmin_j ||zhat_n - e_j||^2]           a point mass
    decoder input  = zhat_n + sg(e_k - zhat_n)                       straight-through
    KL(q || p)     = -log p(z_n = k)                                  log K for a uniform prior

The ELBO is ``log p(x | z) - sum_n KL``; its encoder gradient is the straight-through estimate.
Training adds the codebook and commitment terms ``||sg(zhat) - e||^2 + beta ||zhat - sg(e)||^2``
as a regulariser outside the ELBO, or, with ``ema=True``, only the commitment term while the codebook
follows exponential moving averages of its cluster means (Laplace-smoothed counts; see
:class:`probvq.Codebook`).

A code group of depths ``l = 1..L`` quantises residuals, ``k_l = argmin_j ||r_l - e_j||^2`` with
``r_1 = zhat`` and ``r_{l+1} = r_l - e_{k_l}``. The programs read the straight-through *sum*
``zhat + sg(sum_l e_{k_l} - zhat)`` (the first depth's value carries the whole straight-through
path, the others are plain codes), and the regulariser is RQ-VAE's::

    sum_l  beta ||zhat - sg(sum_{l' <= l} e_{k_l'})||^2  +  ||sg(r_l) - e_{k_l}||^2

(the second term only without EMA, whose averages then collect each depth's residuals).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyro
from torch import Tensor

from probvq.codes import CodePoint
from probvq.factors import regulariser
from probvq.sites import CodeRequest, CodeSite

from .base import GuideFamily, squared_error
from .registry import Setting, register_family


@register_family(
    "vq",
    "hard vector quantisation, straight-through (VQ-VAE; RQ-VAE on code groups)",
    codebook_init="kmeans",
    beta=Setting("commitment weight beta"),
    ema=Setting("learn the codebook by exponential moving averages"),
    decay=Setting("decay of the EMA codebook"),
)
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
        if not beta >= 0:
            raise ValueError(f"beta: the commitment weight must be >= 0, got {beta!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: the EMA decay must lie in (0, 1), got {decay!r}")
        self.beta = float(beta)
        self.ema = bool(ema)
        self.decay = float(decay)

    @property
    def ema_decay(self) -> float | None:
        return self.decay if self.ema else None

    def draw(self, request: CodeRequest, depth: int, residual: Tensor) -> Tensor:
        site = request.sites[depth]
        index = site.space.nearest(residual)
        anchor = request.features if depth == 0 and not self.is_exact else None
        return pyro.sample(site.name, site.distribution(CodePoint(index, site.space, anchor)))

    def guide_codes(self, request: CodeRequest) -> list[Tensor]:
        codes = super().guide_codes(request)
        zhat = request.features
        event_dims = len(request.sites[0].value_shape)
        penalty, partial = 0.0, None
        for site, code in zip(request.sites, codes, strict=True):
            embedding = site.space.embed_index(site.space.index_of(code))
            residual = zhat if partial is None else zhat - partial
            partial = embedding.detach() if partial is None else partial + embedding.detach()
            penalty = penalty + self.beta * squared_error(zhat, partial, event_dims)
            if not self.ema:
                penalty = penalty + squared_error(residual.detach(), embedding, event_dims)
        regulariser(f"{request.name}.vq", penalty)
        return codes
