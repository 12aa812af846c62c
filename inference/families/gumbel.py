"""``gumbel``: a categorical posterior straight from encoder logits, trained through the Concrete
relaxation (Jang et al. 2017, "Categorical Reparameterization with Gumbel-Softmax"; Maddison et al.
2017, "The Concrete Distribution").

No distances to a codebook: per position n the guide's logits are a learned linear read-out of the
encoder's feature, and the codebook only says what each code stands for::

    q(z_n = k | x) = softmax_k(W zhat_n + b)          W: K x D, b: K, per site (the family's)
    decoder input  = sum_k w_k e_k,  w = softmax((log q + g) / tau)   (hard-forward by default)
    rate           = KL(q(z_n) || p(z_n))              analytic, per position

The read-out belongs to the family, so a model written for codebook families (features of the
value's shape D) runs unchanged. Codes are read whole from the feature: a residual code group has
no meaning here (its depths would quantise a residual in value space), so groups are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
from torch import Tensor, nn

from probvq.codes import CodeCategorical
from probvq.sites import CodeRequest, CodeSite

from .registry import register_family
from .relaxed import RelaxedFamily, concrete_settings


@register_family(
    "gumbel",
    "categorical q from encoder logits, Concrete relaxation, analytic KL (Jang / Maddison 2017)",
    codebook_init="normal",
    **concrete_settings(),
)
class Gumbel(RelaxedFamily):
    """Encoder logits and a Concrete relaxation (see the module). Args as
    :class:`~.relaxed.RelaxedFamily`."""

    name = "gumbel"
    answers_groups = False

    def __init__(self, sites: Sequence[CodeSite], **relaxed) -> None:
        super().__init__(sites, **relaxed)
        self.readout = nn.ModuleDict(
            {
                name: nn.Linear(site.space.value_shape.numel(), site.num_codes)
                for name, site in self.sites.items()
            }
        )

    def draw(self, request: CodeRequest, depth: int, residual: Tensor) -> Tensor:
        site = request.sites[depth]
        logits = self.readout[site.name](residual.flatten(-len(site.space.value_shape)))
        q = CodeCategorical(logits, site.space, self.relaxation())
        return pyro.sample(site.name, site.distribution(q))
