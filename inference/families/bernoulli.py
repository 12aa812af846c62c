"""``bernoulli``: binary latent units from encoder logits, relaxed by the binary Concrete.

For a :class:`~probvq.BinaryUnits` site the encoder gives one logit ``a_m`` per unit::

    q(h_m = 1 | x) = sigmoid(a_m)
    training value  h_m = sigmoid((a_m + L_m) / tau),  L_m ~ Logistic(0, 1)

the binary Concrete (Maddison et al. 2017), i.e. the two-code Gumbel-softmax (Jang et al. 2017), or
with ``straight_through`` the hard unit ``1[a_m + L_m > 0]`` forward and the relaxed gradient. The
rate is analytic: ``KL(q_m || p_m)`` against a factorial prior given as logits ``(..., M, 2)``, the
chain of conditional KLs against an autoregressive prior, and ``-H(q) + F(h) + log Z`` against an
energy (e.g. an RBM), with the entropy of the factorial Bernoulli exact (see :mod:`probvq.rates`).
In exact mode the units are hard Bernoulli draws with exact ``log q``.
"""

from __future__ import annotations

import pyro
import torch
from torch import Tensor

from probvq.codes import CodeCategorical
from probvq.sites import CodeRequest, CodeSite
from probvq.spaces import BinaryUnits

from .registry import register_family
from .relaxed import RelaxedFamily, relaxed_settings


@register_family(
    "bernoulli",
    "binary units from encoder logits, binary Concrete relaxation (straight-through option)",
    **{k: v for k, v in relaxed_settings().items() if k != "init_var"},
)
class RelaxedBernoulli(RelaxedFamily):
    """Factorised Bernoulli guide over binary units, trained through the binary Concrete.

    Args as :class:`~.relaxed.RelaxedFamily`.
    """

    name = "bernoulli"
    space_type = BinaryUnits

    def feature_shape(self, site: CodeSite) -> tuple[int, ...]:
        return tuple(site.grid)  # one logit per unit

    def draw(self, request: CodeRequest, depth: int, residual: Tensor) -> Tensor:
        if len(request.sites) > 1:
            raise ValueError(
                f"group {request.name!r}: binary units have no residual to quantise; declare the "
                "depths as separate sites"
            )
        site, logit = request.sites[0], request.features
        logits = torch.stack([torch.zeros_like(logit), logit], -1)
        q = CodeCategorical(logits, site.space, self.relaxation())
        return pyro.sample(site.name, site.distribution(q))
