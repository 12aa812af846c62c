"""``enum``: no guide at all: the codes are summed out exactly, for small code spaces.

The objective is ``-log p(x)`` itself, by summing ``p(z = c) p(x | z = c)`` over every joint
configuration ``c`` of the model's code sites (:mod:`..objectives.enumerate`), and its gradient is
exactly ``-grad log p(x)``. The model side draws from the prior as without a family (ancestral
sampling works); the guide side has nothing to draw, so a guide that ``enum`` answers is refused:
evaluation and training use :class:`EnumELBO`, importance sampling does not apply (the bound is
already tight). Spaces larger than ``max_configurations`` are refused before any work, naming
their size.

This is exact summation by sequential conditioning rather than Pyro's ``TraceEnum_ELBO``: that
enumerates in parallel along a new leading dimension of every value, which a program must
broadcast through, and the zoo's conv nets read ``(B, C, H, W)`` and do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from pyro.infer import ELBO
from torch import Tensor

from probvq.sites import CodeRequest, CodeSite
from probvq.spaces import CodeSpace

from ..objectives.enumerate import configurations, enumerate_model
from .base import GuideFamily
from .registry import Setting, register_family


class EnumELBO(ELBO):
    """``-log p(x)`` by exact summation over the codes of ``sites`` (the guide is not run).

    ``differentiable_parts`` splits it into the exact posterior's distortion and its rate
    ``KL(p(z | x) || p(z))`` (one joint term named after the sites), as the engine logs them.
    """

    free_bits_refused = "has no rate to floor: its objective is -log p(x) itself"

    def __init__(self, sites: Sequence[CodeSite], limit: int, free_bits: float = 0.0, **kwargs) -> None:
        if free_bits:
            raise ValueError(f"free_bits: refused by EnumELBO, which {self.free_bits_refused}")
        super().__init__(**kwargs)
        self.sites, self.limit = list(sites), limit

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("EnumELBO runs the model once per configuration, not on traces")

    def differentiable_parts(self, model, guide, *args, **kwargs) -> dict[str, dict[str, Tensor]]:
        found = enumerate_model(model, self.sites, args[0], self.limit)
        name = "+".join(site.name for site in self.sites)
        return {
            "distortion": {"+".join(found.observed): found.distortion().sum()},
            "rate": {name: found.rate().sum()},
            "regulariser": {},
        }

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        return -enumerate_model(model, self.sites, args[0], self.limit).log_marginal.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


@register_family(
    "enum",
    "no guide: codes summed out exactly, the loss is minus log p(x) (small code spaces only)",
    codebook_init="normal",
    max_configurations=Setting("largest number of joint code configurations to sum over"),
)
class Enum(GuideFamily):
    """Exact summation over the codes (see the module).

    Args:
        sites: the model's code sites. max_configurations: the largest ``prod_s K_s^{N_s}``
        accepted. claims: must be every site (a sum over some codes under another family's
        samples of the rest is not what :class:`EnumELBO` computes).
    """

    name = "enum"
    elbo_class = EnumELBO
    space_type = CodeSpace
    sums_out_codes = True

    def __init__(
        self,
        sites: Sequence[CodeSite],
        max_configurations: int = 4096,
        claims: Iterable[str] | None = None,
    ) -> None:
        super().__init__(sites, claims)
        if max_configurations < 1:
            raise ValueError(f"max_configurations: expected a positive number, got {max_configurations}")
        if claims is not None and set(self.sites) != {site.name for site in sites}:
            raise ValueError("claims: the enum family sums over every code site of the model")
        self.max_configurations = int(max_configurations)
        configurations(list(self.sites.values()), self.max_configurations)

    def elbo(self, **kwargs) -> EnumELBO:
        return EnumELBO(list(self.sites.values()), self.max_configurations, **kwargs)

    def guide_codes(self, request: CodeRequest) -> list[Tensor]:
        raise ValueError(
            f"site {request.name!r}: the 'enum' family has no guide (it sums the codes out); "
            "train and evaluate it through family.elbo() / probvq.inference.evaluate, and use a "
            "sampling family for importance-weighted diagnostics"
        )
