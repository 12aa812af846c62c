"""``score``: exact discrete samples and score-function gradients with learned baselines (NVIL,
Mnih and Gregor 2014).

Per position n, q is the categorical of the distances to the codebook at a learned variance::

    q(z_n = k | x) = softmax_k(-||zhat_n - e_k||^2 / (2 s^2))

or, for binary units (:class:`~probvq.BinaryUnits`), ``q(h_m = 1 | x) = sigmoid(a_m)`` from one
encoder logit per unit, and the programs read the *exact* code ``e_{z_n}`` (the unit's state
``h_m``): nothing is relaxed, so the training objective is the exact ELBO and the surrogate gap is
0. The decoder, the prior and each site's analytic KL get their gradients directly; the encoder
and ``s^2`` get the rest through the score function, ``(c - b(x)) grad log q(z | x)``, with a
learned baseline per site, ``b(x) = w . mean_n zhat_n + b_0`` on the (detached) features (on the
logits themselves for binary units), fitted by regression on the learning signal ``c`` centred by
its running mean (:class:`~..objectives.score.ScoreELBO`, which says why NVIL's division by the
running standard deviation is left out: it would bias the step's direction). Unbiased, and
noisier than a reparameterised gradient: ``benchmarks/gradient_variance.py`` measures by how much.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pyro
import torch
from torch import Tensor, nn

from probvq.codebook import Codebook
from probvq.codes import CodeCategorical, Embedded
from probvq.sites import CodeRequest, CodeSite
from probvq.spaces import BinaryUnits, CodeSpace

from ..objectives.score import RunningSignal, ScoreELBO
from .base import GuideFamily
from .registry import Setting, register_family


@register_family(
    "score",
    "exact codes, score function gradients with learned baselines (NVIL)",
    codebook_init="kmeans",
    init_var=Setting("initial quantisation variance s^2"),
)
class Score(GuideFamily):
    """Exact samples with NVIL gradients (see the module).

    Args:
        sites: the model's code sites. init_var: initial ``s^2``. claims: sites it answers.
    """

    name = "score"
    elbo_class = ScoreELBO
    space_type = CodeSpace

    def __init__(
        self,
        sites: Sequence[CodeSite],
        init_var: float = 1.0,
        claims: Iterable[str] | None = None,
    ) -> None:
        super().__init__(sites, claims)
        if not (math.isfinite(init_var) and init_var > 0):
            raise ValueError(f"init_var: the initial variance must be positive, got {init_var!r}")
        self.log_var = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(math.log(init_var)))
             for name, site in self.sites.items() if isinstance(site.space, Codebook)}
        )  # fmt: skip
        self.baseline = nn.ModuleDict(
            {
                name: nn.Linear(math.prod(self._pooled_shape(site)), 1)
                for name, site in self.sites.items()
            }
        )
        self.running = nn.ModuleDict({name: RunningSignal() for name in self.sites})

    def check_site(self, site: CodeSite) -> None:
        if not isinstance(site.space, Codebook | BinaryUnits):
            raise ValueError(
                f"sites: the 'score' family infers Codebook and BinaryUnits sites; site "
                f"{site.name!r} has a {type(site.space).__name__} space"
            )

    def feature_shape(self, site: CodeSite) -> tuple[int, ...]:
        return tuple(site.grid) if isinstance(site.space, BinaryUnits) else tuple(site.value_shape)

    @staticmethod
    def _pooled_shape(site: CodeSite) -> tuple[int, ...]:
        """What the baseline reads: the unit logits, or the features pooled over positions."""
        return tuple(site.grid) if isinstance(site.space, BinaryUnits) else tuple(site.space.value_shape)

    def draw(self, request: CodeRequest, depth: int, residual: Tensor) -> Tensor:
        site = request.sites[depth]
        if isinstance(site.space, BinaryUnits):
            if len(request.sites) > 1:
                raise ValueError(
                    f"group {request.name!r}: binary units have no residual to quantise; declare "
                    "the depths as separate sites"
                )
            logits = torch.stack([torch.zeros_like(residual), residual], -1)
            pooled = residual.detach().flatten(-len(site.grid))
        else:
            logits = -site.space.distances(residual) / (2.0 * torch.exp(self.log_var[site.name]))
            pooled = residual.detach().flatten(-1 - len(site.grid), -2).mean(-2)
            pooled = pooled.flatten(-len(site.space.value_shape))
        q = CodeCategorical(logits, site.space, Embedded())
        baseline = self.baseline[site.name](pooled).squeeze(-1)
        return pyro.sample(
            site.name,
            site.distribution(q),
            infer={"baseline": {"baseline_value": baseline, "running": self.running[site.name]}},
        )
