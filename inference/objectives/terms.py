"""ELBO terms read off Pyro traces, per site and per data point.

Nothing here knows a model's internals: it runs the guide, replays the model on the guide's values,
and reads every sample site by its role::

    ELBO(x) = - sum_{observed s} distortion_s(x) - sum_{latent s} rate_s(x)
    distortion_s = -log p(x_s | ...)                 observed sites
    rate_s       = probvq.rates.rate(q_s, p_s, z_s)  latent sites: analytic KL where it exists,
                                                      the prior kind's estimate otherwise
                   - log f                            plus every model factor f flagged as part of
                                                      that latent's prior (RATE_OF)

Training-only penalties (guide sites flagged :data:`~probvq.factors.REGULARISER`) are kept apart and
are not part of the ELBO. Every latent must be sampled by both programs: a latent the guide never
draws has no posterior, and one drawn only in the guide leaves the bound without a prior for it, so
both are refused. The analytic rate at a site is exact when the guide draws every latent the model's
prior at that site depends on before it, the top-down order all probvq families keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from probvq.factors import INTEGRATES_OUT, RATE_OF, REGULARISER
from probvq.rates import CodeGuide, rate, unwrap
from probvq.sites import DATA_PLATE

KINDS = ("distortion", "rate", "regulariser")


def run_traces(model: Callable, guide: Callable, *args, **kwargs) -> tuple[Trace, Trace]:
    """Trace the guide, then the model replayed on the guide's values (plate sites pruned)."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    replayed = poutine.replay(model, trace=guide_trace)
    model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


@dataclass(frozen=True)
class Term:
    """One site's contribution: ``kind`` (of :data:`KINDS`), the site it is reported under, its value
    (batch-shaped, unscaled, a cost: the negative ELBO's part) and the trace node it comes from."""

    kind: str
    name: str
    value: Tensor
    node: dict

    def scaled(self) -> Tensor:
        """The value with the node's scale and mask applied (what the loss adds up)."""
        scale, mask = self.node["scale"], self.node["mask"]
        value = self.value if isinstance(scale, float) and scale == 1.0 else self.value * scale
        return value if mask is None else torch.where(mask, value, torch.zeros_like(value))


def _log_prob(site: dict) -> Tensor:
    return site["fn"].log_prob(site["value"])


def _is_latent(site: dict) -> bool:
    return site["type"] == "sample" and not site["is_observed"]


def _is_factor(site: dict) -> bool:
    return isinstance(unwrap(site["fn"])[0], dist.Unit)


def check_latents(model_trace: Trace, guide_trace: Trace) -> set[str]:
    """The latents of the model, after refusing any that only one of the programs samples."""
    model = {name for name, site in model_trace.nodes.items() if _is_latent(site)}
    guide = {name for name, site in guide_trace.nodes.items() if _is_latent(site)}
    if model - guide:
        name = sorted(model - guide)[0]
        raise ValueError(f"site {name!r}: a latent of the model that the guide does not sample")
    if guide - model:
        name = sorted(guide - model)[0]
        raise ValueError(
            f"site {name!r}: a latent sampled only in the guide; with no prior for it the "
            "bounds do not hold (add it to the model too)"
        )
    return model


def site_terms(model_trace: Trace, guide_trace: Trace) -> Iterator[Term]:
    """Every site's term of one guide sample, by role (see the module)."""
    latents = check_latents(model_trace, guide_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            owner = site["infer"].get(RATE_OF)
            if owner is not None and owner not in latents:
                raise ValueError(
                    f"site {name!r}: a prior factor of {owner!r}, which is not a latent of the model"
                )
            yield Term("rate" if owner else "distortion", owner or name, -_log_prob(site), site)
            continue
        guide_site = guide_trace.nodes[name]
        try:
            value = rate(guide_site["fn"], site["fn"], guide_site["value"])
        except NotImplementedError as err:
            raise ValueError(f"site {name!r}: {err}") from err
        yield Term("rate", name, value, guide_site)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or name in model_trace.nodes:
            continue
        if site["infer"].get(REGULARISER):
            yield Term("regulariser", name, _log_prob(site), site)


def per_example(value: Tensor, site: dict) -> Tensor:
    """Sum a site's batch-shaped term over every dimension but the data plate's.

    The site's scale is not applied: a per-example term is the unscaled log-density (a subsampled
    plate's scale ``N / B`` belongs to the total, not to each example).
    """
    frames = [f for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    if not frames:
        raise ValueError(
            f"site {site['name']!r} lies outside the {DATA_PLATE!r} plate, so it has no "
            "per-example value"
        )
    keep = value.dim() + frames[0].dim
    others = tuple(d for d in range(value.dim()) if d != keep)
    return value.sum(others) if others else value


@dataclass
class ElboTerms:
    """Per-example terms, each a tensor of shape ``(batch,)``, keyed by site name (costs, nats)."""

    distortion: dict[str, Tensor] = field(default_factory=dict)
    rate: dict[str, Tensor] = field(default_factory=dict)
    regulariser: dict[str, Tensor] = field(default_factory=dict)

    @property
    def elbo(self) -> Tensor:
        return -(sum(self.distortion.values()) + sum(self.rate.values()))


def elbo_terms(model_trace: Trace, guide_trace: Trace) -> ElboTerms:
    """Decompose the ELBO of one guide sample into per-site, per-example terms."""
    terms = ElboTerms()
    for term in site_terms(model_trace, guide_trace):
        found = getattr(terms, term.kind)
        value = per_example(term.value, term.node)
        found[term.name] = found[term.name] + value if term.name in found else value
    return terms


def distortion(model_trace: Trace) -> Tensor:
    """The total distortion per example: ``-log p`` of every observed site that is no prior factor."""
    total = 0
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"] and not site["infer"].get(RATE_OF):
            total = total + per_example(-_log_prob(site), site)
    if isinstance(total, int):
        raise ValueError("no observed site: a model without data has no distortion")
    return total


def collapse_scores(model: Callable, model_trace: Trace, guide_trace: Trace, *args) -> dict[str, Tensor]:
    """Per code site, how much the distortion grows when its codes are redrawn from its prior.

    For each site of the guide's sample the codes are replaced by one draw from the model's prior
    at that site (given the guide's codes above it), every other site keeps the guide's value,
    and the model is replayed on ``args``: the score is the replayed distortion minus the
    original, per example. A layer whose codes the decoder ignores (a collapsed layer) scores
    about 0.
    """
    base = distortion(model_trace)
    scores = {}
    for name in code_indices(guide_trace):
        swapped = guide_trace.copy()
        swapped.nodes[name] = {
            **guide_trace.nodes[name],
            "value": model_trace.nodes[name]["fn"].sample(),
        }
        replayed = poutine.trace(poutine.replay(model, trace=swapped)).get_trace(*args)
        scores[name] = distortion(prune_subsample_sites(replayed)) - base
    return scores


def code_indices(guide_trace: Trace) -> dict[str, tuple[int, Tensor]]:
    """The code indices of every code site in a guide trace, with the site's K."""
    codes = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        fn, _ = unwrap(site["fn"])
        if isinstance(fn, CodeGuide):
            codes[name] = (fn.space.num_codes, fn.space.index_of(site["value"]))
    return codes


def observed_dims(model_trace: Trace) -> int:
    """Number of observed values per data point (the denominator of bits/dim); factors add none."""
    total = 0
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"] and not _is_factor(site):
            total += site["fn"].event_shape.numel()
    return total


def integrated_out(model_trace: Trace) -> list[str]:
    """The latents flagged :data:`~probvq.factors.INTEGRATES_OUT`, which :func:`log_weight` leaves
    out while the ELBO pays their rates."""
    return [
        name
        for name, site in model_trace.nodes.items()
        if _is_latent(site) and site["infer"].get(INTEGRATES_OUT)
    ]


def log_weight(model_trace: Trace, guide_trace: Trace) -> Tensor:
    """The importance log-weight ``log p(x, z) - log q(z | x)`` of the guide's sample, per example.

    Every site is scored at its sampled value (no analytic KL), so ``logsumexp`` over ``k`` draws
    minus ``log k`` is the importance-weighted bound. Training-only penalty sites are left out, and
    so are latents flagged :data:`~probvq.factors.INTEGRATES_OUT`, whose densities integrate to one.
    """
    latents = check_latents(model_trace, guide_trace)
    total = 0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get(INTEGRATES_OUT):
            continue
        total = total + per_example(_log_prob(site), site)
        if name in latents:
            guide_site = guide_trace.nodes[name]
            total = total - per_example(_log_prob(guide_site), guide_site)
    return total


def observed_means(model_trace: Trace) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, value, mean)`` of every observed site whose likelihood has a mean."""
    found = []
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"] and not _is_factor(site):
            try:
                found.append((name, site["value"], site["fn"].mean))
            except NotImplementedError:
                continue
    return found


def reconstruction_error(model_trace: Trace) -> Tensor:
    """Mean squared error per example between observed values and the likelihood's mean."""
    errors = []
    for name, value, mean in observed_means(model_trace):
        site = model_trace.nodes[name]
        event = site["fn"].event_shape
        squared = (value - mean).pow(2).flatten(-len(event)).sum(-1)
        errors.append(per_example(squared, site) / event.numel())
    if not errors:
        raise ValueError("no observed site with a mean to compare against")
    return torch.stack(errors).mean(0)
