"""``score``: exact discrete samples and score-function gradients with learned baselines (NVIL,
Mnih and Gregor 2014).

Per position n, q is the categorical of the distances to the codebook at a learned variance::

    q(z_n = k | x) = softmax_k(-||zhat_n - e_k||^2 / (2 s^2))

and the programs read the *exact* code ``e_{z_n}``: nothing is relaxed, so the training objective
is the exact ELBO and the surrogate gap is 0. The decoder, the prior and each site's analytic KL
get their gradients directly; the encoder and ``s^2`` get the rest through the score function,
``(c - b(x)) grad log q(z | x)``, with a learned baseline per site, ``b(x) = w . mean_n zhat_n + b_0``
on the (detached) features, fitted by regression on the learning signal ``c`` centred by its
running mean and (``normalise``) scaled by its running standard deviation
(:class:`~..objectives.score.ScoreELBO`). Unbiased, and noisier than a reparameterised gradient:
``benchmarks/gradient_variance.py`` measures by how much.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pyro
import torch
from torch import Tensor, nn

from probvq.codes import CodeCategorical, Embedded
from probvq.sites import CodeRequest, CodeSite

from ..objectives.score import RunningSignal, ScoreELBO
from .base import GuideFamily
from .registry import Setting, register_family


@register_family(
    "score",
    "exact codes, score function gradients with learned baselines (NVIL)",
    codebook_init="kmeans",
    init_var=Setting("initial quantisation variance s^2"),
    normalise=Setting("divide the learning signal by its running standard deviation (NVIL)"),
)
class Score(GuideFamily):
    """Exact samples with NVIL gradients (see the module).

    Args:
        sites: the model's code sites. init_var: initial ``s^2``.
        normalise: NVIL's variance normalisation of the learning signal (see
            :class:`~..objectives.score.ScoreELBO`). claims: sites it answers.
    """

    name = "score"
    elbo_class = ScoreELBO

    def __init__(
        self,
        sites: Sequence[CodeSite],
        init_var: float = 1.0,
        normalise: bool = True,
        claims: Iterable[str] | None = None,
    ) -> None:
        super().__init__(sites, claims)
        if not (math.isfinite(init_var) and init_var > 0):
            raise ValueError(f"init_var: the initial variance must be positive, got {init_var!r}")
        self.log_var = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(math.log(init_var))) for name in self.sites}
        )
        self.baseline = nn.ModuleDict(
            {name: nn.Linear(site.space.value_shape.numel(), 1) for name, site in self.sites.items()}
        )
        self.running = nn.ModuleDict({name: RunningSignal() for name in self.sites})
        self.normalise = bool(normalise)

    def elbo(self, **kwargs) -> ScoreELBO:
        return ScoreELBO(normalise=self.normalise, **kwargs)

    def draw(self, request: CodeRequest, depth: int, residual: Tensor) -> Tensor:
        site = request.sites[depth]
        logits = -site.space.distances(residual) / (2.0 * torch.exp(self.log_var[site.name]))
        q = CodeCategorical(logits, site.space, Embedded())
        pooled = residual.detach().flatten(-1 - len(site.grid), -2).mean(-2)
        baseline = self.baseline[site.name](pooled.flatten(-len(site.space.value_shape))).squeeze(-1)
        return pyro.sample(
            site.name,
            site.distribution(q),
            infer={"baseline": {"baseline_value": baseline, "running": self.running[site.name]}},
        )
