"""ELBO diagnostics of a model/guide pair over a dataset, per data point and aggregated.

:func:`diagnose` reads only Pyro traces, so any program written with :func:`probvq.code` gets it:

* the exact ELBO decomposed per site: distortion ``-log p(x_s | z)`` of every observed site and rate
  of every latent site (:func:`probvq.rates.rate`: analytic where it can be), in nats and
  bits/dim, and the training surrogate's gap to it (:func:`..objectives.evaluate.point_terms`);
* the importance-weighted bound ``IWAE_k`` with exact discrete ``log q``
  (:mod:`..objectives.importance`), its
  convergence curve over ``k' = 1, 10, 100, ... k`` from the same draws, and the mean log-weight,
  an estimate from ``k`` draws of the code-only ELBO :attr:`~..objectives.evaluate.PointTerms.code_elbo`
  (the exact ELBO for every family but ``sq``, whose weights integrate its dequantisation
  variable out: there it lies above the exact ELBO by that term), which it must agree with up to
  noise;
* Pareto k-hat per point from the same log-weights (:mod:`.psis`);
* codebook usage per code site over the whole pass (perplexity, dead codes, counts).

Memory: every pass holds at most the rows (points x draws) that fit under ``memory_mib``, measured
by three probe passes (:mod:`.memory`). The model's data encoders run once per point of a pass
(:func:`probvq.repeats.data_encoders`), the rest of the guide and the model once per draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from probvq.likelihoods import bits_per_dim
from probvq.repeats import data_encoders, once_per_point
from probvq.sites import DiscreteVAE

from ..objectives.evaluate import (
    PointTerms,
    check_inputs,
    evaluation,
    mean_and_se,
    point_terms,
    summarise,
)
from ..objectives.importance import curve_sizes, iwae_bound, log_weights, sample_log_weights
from ..objectives.terms import observed_means, run_traces
from .memory import MIB, row_cost
from .psis import khat_summary, pareto_khat

if TYPE_CHECKING:
    from ..families import FamilyStack, GuideFamily


@dataclass
class Diagnostics:
    """Per-point diagnostics of one pass (CPU tensors of shape ``(N,)`` unless noted)."""

    terms: PointTerms
    k: int
    rows_per_pass: int
    memory_mib: float
    iwae: dict[int, Tensor]
    """``IWAE_k'`` per point for each ``k'`` of the convergence curve (the last is ``k``)."""
    mean_log_weight: Tensor
    khat: Tensor
    log_weights: Tensor | None
    """``(N, k)`` when asked for."""
    reconstructions: tuple[Tensor, Tensor] | None
    """Data and the likelihood's mean for the first few points, shaped like the observed site."""

    @property
    def bound(self) -> Tensor:
        return self.iwae[self.k]

    def summary(self) -> dict:
        """Means with standard errors, shares of k-hat above 0.5 and 0.7, usage; JSON-ready."""
        dims = self.terms.observed_dims
        iwae = mean_and_se(self.bound)
        summary = summarise(self.terms)
        if "conservative" in summary:
            bound = iwae["mean"] - summary["conservative"]["log_z_shift"]
            summary["conservative"].update(iwae=bound, iwae_bits_per_dim=bits_per_dim(-bound, dims))
        return {
            **summary,
            "iwae": {
                "k": self.k,
                **iwae,
                "bits_per_dim": bits_per_dim(-iwae["mean"], dims),
                "minus_exact_elbo": mean_and_se(self.bound - self.terms.exact),
                "minus_code_elbo": mean_and_se(self.bound - self.terms.code_elbo),
            },
            "iwae_curve": {str(size): mean_and_se(values) for size, values in self.iwae.items()},
            "mean_log_weight": mean_and_se(self.mean_log_weight),
            "pareto_khat": khat_summary(self.khat),
            "num_codes": {name: int(counts.numel()) for name, counts in self.terms.usage.items()},
            "rows_per_pass": self.rows_per_pass,
            "memory_mib": self.memory_mib,
        }


def check_settings(k: int, memory_mib: float, batch_size: int = 1, examples: int = 1) -> None:
    """Refuse settings :func:`diagnose` cannot use, naming the argument."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k: expected a positive number of importance samples, got {k!r}")
    if not (math.isfinite(memory_mib) and memory_mib > 0):
        raise ValueError(f"memory_mib: expected a positive finite size in MiB, got {memory_mib!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not (isinstance(examples, int) and examples >= 1):
        raise ValueError(f"examples: expected a positive integer, got {examples!r}")


@dataclass
class _Importance:
    """What :func:`diagnose` keeps of each group's log-weights."""

    curve: dict[int, list[Tensor]]
    mean_log_weight: list[Tensor] = field(default_factory=list)
    khat: list[Tensor] = field(default_factory=list)
    kept: list[Tensor] = field(default_factory=list)

    def add(self, log_w: Tensor, keep: bool) -> None:
        for size, values in self.curve.items():
            values.append(iwae_bound(log_w[:, :size]))
        self.mean_log_weight.append(log_w.mean(1))
        self.khat.append(pareto_khat(log_w))
        if keep:
            self.kept.append(log_w)


def diagnose(
    vae: DiscreteVAE,
    family: GuideFamily | FamilyStack,
    x: Tensor,
    k: int = 1000,
    memory_mib: float = 256.0,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
    keep_log_weights: bool = False,
    examples: int = 16,
    collapse: bool = True,
) -> Diagnostics:
    """Diagnose ``vae`` under ``family`` on prepared data ``x`` with ``k`` importance draws per point.

    ``batch_size`` bounds the points per pass of the decomposition (lowered further to fit the
    memory cap); ``examples`` points are kept with their reconstructions for plotting; ``collapse``
    measures the layer-collapse scores (:func:`..objectives.evaluate.point_terms`). The short
    passes (memory probes, decomposition) run first, so bad input fails before the long one.
    """
    check_settings(k, memory_mib, batch_size, examples)
    check_inputs(vae, x)
    model, guide = family.wrap(vae.model, pyro_params=False), family.wrap(vae.guide, pyro_params=False)
    encoders, cap = data_encoders(vae), memory_mib * MIB
    with evaluation(vae, family, seed) as device, family.exact():
        first = x[:1].to(device)

        def probe(points: int, draws: int) -> Tensor:
            with once_per_point(encoders, draws):
                return sample_log_weights(model, guide, first.repeat_interleave(points * draws, dim=0))

        cost = row_cost(probe, device)
        observed = observed_means(run_traces(model, guide, x[:examples].to(device))[0])
    rows = cost.rows_within(cap, k)
    # The decomposition draws once per point, so its encoders run on every row.
    terms = point_terms(
        vae, family, x, min(batch_size, cost.rows_within(cap, 1)), seed, progress, collapse
    )
    found = _Importance({size: [] for size in curve_sizes(k)})
    with evaluation(vae, family, seed) as device, family.exact():
        bar = tqdm(total=x.shape[0], desc=f"iwae k={k}", disable=not progress, leave=False)
        for log_w in log_weights(model, guide, x.to(device), k, rows, encoders):
            found.add(log_w.double().cpu(), keep_log_weights)
            bar.update(log_w.shape[0])
        bar.close()
    return Diagnostics(
        terms=terms,
        k=k,
        rows_per_pass=rows,
        memory_mib=memory_mib,
        iwae={size: torch.cat(values) for size, values in found.curve.items()},
        mean_log_weight=torch.cat(found.mean_log_weight),
        khat=torch.cat(found.khat),
        log_weights=torch.cat(found.kept) if keep_log_weights else None,
        reconstructions=(observed[0][1].cpu(), observed[0][2].cpu()) if observed else None,
    )
