"""Evaluation: the exact ELBO and what a relaxed surrogate claims, over a whole dataset.

For every batch the guide runs twice:

* exact (``with family.exact()``): hard codes drawn from the exact categorical q, exact ``log q``,
  analytic KL; this is the honest bound on ``log p(x)`` for every family;
* surrogate: the family's training-time sampling (relaxed or straight-through values), scored the
  same way; the decoder may read more from a relaxed value than a hard code carries, so this value
  can sit above the true bound. ``gap = surrogate - exact`` is reported per example.

Codebook usage is counted from the exact codes over the whole pass (batch perplexity depends on the
batch size): perplexity ``exp(H(usage))`` and the number of codes never used. The layer-collapse
score of each code site (how much the distortion grows when its codes are redrawn from its prior,
:func:`~.terms.collapse_scores`) costs one more model pass per site and can be switched off.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from probvq.codebook import perplexity
from probvq.hooks import before_evaluation
from probvq.likelihoods import bits_per_dim
from probvq.sites import DiscreteVAE

from .enumerate import enumerate_model
from .terms import (
    KINDS,
    code_indices,
    collapse_scores,
    elbo_terms,
    integrated_out,
    observed_dims,
    reconstruction_error,
    run_traces,
)

if TYPE_CHECKING:
    from ..families import FamilyStack, GuideFamily


def mean_and_se(values: Tensor) -> dict[str, float | None]:
    """Mean and its standard error over examples (``None`` from a single example)."""
    values = values.double()
    if values.numel() < 2:
        return {"mean": float(values.mean()), "se": None}
    return {"mean": float(values.mean()), "se": float(values.std() / math.sqrt(values.numel()))}


def check_inputs(vae: DiscreteVAE, x: Tensor, name: str = "x") -> None:
    """Refuse empty, non-float or non-finite data, then ask the model (``check_data``) if it can."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch of data")
    if not x.is_floating_point():
        raise ValueError(
            f"{name}: expected prepared float data (the likelihood's prepare), got {x.dtype}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: the data contains NaN or infinite values")
    check = getattr(vae, "check_data", None)
    if check is not None:
        check(x, name)


def _devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


@contextmanager
def evaluation(vae: DiscreteVAE, family: GuideFamily | FamilyStack, seed: int) -> Iterator[torch.device]:
    """Evaluation mode, no gradients, and a forked RNG seeded by ``seed``; yields the device.

    The caller's random stream and the modules' train/eval modes are left as they were.
    """
    modules = [m for m in (vae, family) if isinstance(m, nn.Module)]
    was_training = [m.training for m in modules]
    device = next(p.device for m in modules for p in m.parameters())
    try:
        for m in modules:
            m.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=_devices(device)):
            torch.manual_seed(seed)
            yield device
    finally:
        for m, mode in zip(modules, was_training, strict=True):
            m.train(mode)


def _batches(x: Tensor, batch_size: int, progress: bool) -> Iterable[Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    starts = range(0, x.shape[0], batch_size)
    for start in tqdm(starts, desc="evaluate", disable=not progress, leave=False):
        yield x[start : start + batch_size]


@dataclass
class PointTerms:
    """Per-example figures over a dataset (tensors of shape ``(N,)`` on the CPU, nats).

    ``usage`` holds, per code site, how often each code was drawn over the whole pass;
    ``surrogate_costs`` the surrogate pass's distortion and rate per site, whose differences from the
    exact ones split the gap by site; ``collapse`` (when measured) the layer-collapse score of each
    code site (:func:`~.terms.collapse_scores`).
    """

    exact: Tensor
    surrogate: Tensor
    reconstruction_mse: Tensor
    distortion: dict[str, Tensor]
    rate: dict[str, Tensor]
    regulariser: dict[str, Tensor]
    usage: dict[str, Tensor]
    observed_dims: int
    surrogate_costs: dict[str, Tensor]
    collapse: dict[str, Tensor] = field(default_factory=dict)
    normalisers: dict[str, dict] = field(default_factory=dict)
    """The ``before_evaluation`` reports of the model's modules (e.g. an RBM prior's ``log Z``)."""
    integrated_out: tuple[str, ...] = ()
    """Latents flagged :data:`~probvq.factors.INTEGRATES_OUT` (e.g. SQ's ``z.deq``): the ELBO pays
    their rates, importance weights integrate them out."""

    @property
    def code_elbo(self) -> Tensor:
        """The ELBO less the rates of :attr:`integrated_out` latents: ``E_q[log p(x, z) - log q(z |
        x)]`` over the codes alone, the expectation of an importance log-weight (above the ELBO
        by SQ's dequantisation term; equal to it for every other family)."""
        return self.exact + sum((self.rate[name] for name in self.integrated_out), torch.zeros(()))

    def gap_by_site(self) -> dict[str, Tensor]:
        """``exact cost - surrogate cost`` of each distortion and rate site: the gap's parts.

        They sum to :attr:`gap`. A relaxed sample lowers a site's cost where the next layer (or
        the decoder) reads more from it than from a hard code.
        """
        exact = {**self.distortion, **self.rate}
        return {name: exact[name] - value for name, value in self.surrogate_costs.items()}

    @property
    def gap(self) -> Tensor:
        return self.surrogate - self.exact


def point_terms(
    vae: DiscreteVAE,
    family: GuideFamily | FamilyStack,
    x: Tensor,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
    collapse: bool = True,
) -> PointTerms:
    """Run the exact and the surrogate guide over ``x`` (prepared data) and keep every term.

    With ``collapse`` the model also runs once more per code site and batch, with that site's codes
    redrawn from its prior: the layer-collapse scores.
    """
    check_inputs(vae, x)
    if getattr(family, "sums_out_codes", False):
        return _enumerated_terms(vae, family, x, batch_size, seed, progress)
    model, guide = family.wrap(vae.model, pyro_params=False), family.wrap(vae.guide, pyro_params=False)
    exact, surrogate, recon = [], [], []
    parts: dict[str, dict[str, list[Tensor]]] = {kind: defaultdict(list) for kind in KINDS}
    usage: dict[str, Tensor] = {}
    costs: dict[str, list[Tensor]] = defaultdict(list)
    scores: dict[str, list[Tensor]] = defaultdict(list)
    dims, integrated = 0, {}
    with evaluation(vae, family, seed) as device:
        normalisers = before_evaluation(seed, vae, family)
        for batch in _batches(x, batch_size, progress):
            batch = batch.to(device)
            with family.exact():
                model_trace, guide_trace = run_traces(model, guide, batch)
            terms = elbo_terms(model_trace, guide_trace)
            exact.append(terms.elbo.cpu())
            for kind in KINDS:
                for name, value in getattr(terms, kind).items():
                    parts[kind][name].append(value.cpu())
            for name, (num_codes, index) in code_indices(guide_trace).items():
                found = torch.bincount(index.flatten(), minlength=num_codes).cpu()
                usage[name] = usage[name] + found if name in usage else found
            recon.append(reconstruction_error(model_trace).cpu())
            if collapse:
                for name, score in collapse_scores(model, model_trace, guide_trace, batch).items():
                    scores[name].append(score.cpu())
            dims = observed_dims(model_trace)
            integrated.update(dict.fromkeys(integrated_out(model_trace)))
            relaxed = elbo_terms(*run_traces(model, guide, batch))
            surrogate.append(relaxed.elbo.cpu())
            for name, value in {**relaxed.distortion, **relaxed.rate}.items():
                costs[name].append(value.cpu())
    joined = {kind: {name: torch.cat(v) for name, v in sites.items()} for kind, sites in parts.items()}
    return PointTerms(
        exact=torch.cat(exact),
        surrogate=torch.cat(surrogate),
        reconstruction_mse=torch.cat(recon),
        **joined,
        usage=usage,
        observed_dims=dims,
        surrogate_costs={name: torch.cat(v) for name, v in costs.items()},
        collapse={name: torch.cat(v) for name, v in scores.items()},
        normalisers=normalisers,
        integrated_out=tuple(integrated),
    )


def _enumerated_terms(
    vae: DiscreteVAE, family: GuideFamily, x: Tensor, batch_size: int, seed: int, progress: bool
) -> PointTerms:
    """The exact terms of a family that sums the codes out (``enum``): the bound is ``log p(x)``,
    no surrogate differs from it, and usage counts the posterior's expected code assignments."""
    model = family.wrap(vae.model, pyro_params=False)
    sites = list(family.sites.values())
    name = "+".join(site.name for site in sites)
    exact, distortion, rate, recon = [], [], [], []
    usage = {site.name: torch.zeros(site.num_codes, dtype=torch.float64) for site in sites}
    observed, dims = "x", 0
    with evaluation(vae, family, seed) as device:
        normalisers = before_evaluation(seed, vae, family)
        for batch in _batches(x, batch_size, progress):
            found = enumerate_model(model, sites, batch.to(device), family.max_configurations)
            exact.append(found.log_marginal.cpu())
            distortion.append(found.distortion().cpu())
            rate.append(found.rate().cpu())
            weights = found.posterior.sum(1).double().cpu()  # (C,): expected configurations
            for site in sites:
                onehot = torch.nn.functional.one_hot(found.indices[site.name].cpu(), site.num_codes)
                usage[site.name] += (weights[:, None] * onehot.flatten(1, -2).sum(1).double()).sum(0)
            if found.squared_error is not None:
                recon.append((found.posterior * found.squared_error).sum(0).cpu())
            observed, dims = "+".join(found.observed), found.observed_dims
    joined = torch.cat(exact)
    return PointTerms(
        exact=joined,
        surrogate=joined,
        reconstruction_mse=torch.cat(recon) if recon else torch.full_like(joined, math.nan),
        distortion={observed: torch.cat(distortion)},
        rate={name: torch.cat(rate)},
        regulariser={},
        usage=usage,
        observed_dims=dims,
        surrogate_costs={observed: torch.cat(distortion), name: torch.cat(rate)},
        normalisers=normalisers,
    )


def conservative_shift(normalisers: dict[str, dict]) -> float | None:
    """How much every point's ``log p(x, z)`` falls when each estimated ``log Z`` (a report with a
    ``conservative_log_z``, e.g. :class:`~probvq.rbm.RBMPrior`'s AIS) is replaced by its
    conservative estimate; ``None`` when no ``log Z`` was estimated. Each normaliser enters once
    per example (one energy-prior site per example, as in the ``rbm`` model), so bounds shift by
    exactly this much and their standard errors do not change."""
    shifts = [
        report["conservative_log_z"] - report["log_z"]
        for report in normalisers.values()
        if "conservative_log_z" in report
    ]
    return sum(shifts) if shifts else None


def summarise(points: PointTerms) -> dict:
    """Means and standard errors of :class:`PointTerms`; per-site terms also in bits/dim."""

    def site_summary(values: Tensor) -> dict:
        figures = mean_and_se(values)
        return {**figures, "bits_per_dim": bits_per_dim(figures["mean"], points.observed_dims)}

    summary = {
        "examples": int(points.exact.shape[0]),
        "observed_dims": points.observed_dims,
        "exact_elbo": mean_and_se(points.exact),
        **({"code_elbo": mean_and_se(points.code_elbo)} if points.integrated_out else {}),
        "exact_bits_per_dim": bits_per_dim(-float(points.exact.double().mean()), points.observed_dims),
        "surrogate_elbo": mean_and_se(points.surrogate),
        "surrogate_gap": mean_and_se(points.gap),
        "surrogate_gap_by_site": {
            name: mean_and_se(value)["mean"] for name, value in points.gap_by_site().items()
        },
        "reconstruction_mse": mean_and_se(points.reconstruction_mse),
    }
    for kind in KINDS:
        summary[kind] = {name: site_summary(v) for name, v in getattr(points, kind).items()}
    summary["perplexity"] = {name: perplexity(c) for name, c in points.usage.items()}
    summary["dead_codes"] = {name: int((c == 0).sum()) for name, c in points.usage.items()}
    if points.normalisers:
        summary["log_normalisers"] = points.normalisers
    shift = conservative_shift(points.normalisers)
    if shift is not None:
        elbo = summary["exact_elbo"]["mean"] - shift
        summary["conservative"] = {
            "log_z_shift": shift,
            "exact_elbo": elbo,
            "exact_bits_per_dim": bits_per_dim(-elbo, points.observed_dims),
        }
    if points.collapse:
        summary["collapse_score"] = {name: mean_and_se(v) for name, v in points.collapse.items()}
    return summary


def evaluate(
    vae: DiscreteVAE,
    family: GuideFamily | FamilyStack,
    x: Tensor,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
    collapse: bool = True,
) -> dict:
    """Exact and surrogate ELBO, per-site terms, usage, reconstruction and (with ``collapse``)
    layer-collapse scores over ``x``.

    ``x`` is prepared data (the likelihood's ``prepare``). Sampling is seeded by ``seed`` inside a
    forked RNG, so evaluating never changes the caller's random stream. All figures are in nats
    per example unless named otherwise. ``progress`` shows a bar over batches.
    """
    return summarise(point_terms(vae, family, x, batch_size, seed, progress, collapse))
