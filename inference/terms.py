"""ELBO terms read off Pyro traces, per site and per data point.

Nothing here knows a model's internals: it runs the guide, replays the model on the guide's values,
and reads every sample site::

    ELBO(x) = - sum_{observed s} distortion_s(x) - sum_{latent s} rate_s(x)
    distortion_s = -log p(x_s | ...)
    rate_s       = KL(q_s || p_s)   where an analytic KL is registered (given the upstream values),
                 = log q_s - log p_s otherwise (a one-sample estimate)

Guide-only auxiliary latents add their ``log q`` to the rate; training-only penalties (sites flagged
with :data:`REGULARISER`) are kept apart and are not part of the ELBO. The analytic KL at a site is
exact when the guide draws every latent the model's prior at that site depends on before it, the
top-down order all probvq families keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro import poutine
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from torch.distributions import Independent, kl_divergence

from probvq.codes import CodeCategorical, CodePoint
from probvq.sites import DATA_PLATE

from .family import INTEGRATES_OUT, REGULARISER


def run_traces(model: Callable, guide: Callable, *args, **kwargs) -> tuple[Trace, Trace]:
    """Trace the guide, then the model replayed on the guide's values (plate sites pruned)."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    replayed = poutine.replay(model, trace=guide_trace)
    model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


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
    """Per-example terms, each a tensor of shape ``(batch,)``, keyed by site name."""

    distortion: dict[str, Tensor] = field(default_factory=dict)
    rate: dict[str, Tensor] = field(default_factory=dict)
    regulariser: dict[str, Tensor] = field(default_factory=dict)

    @property
    def elbo(self) -> Tensor:
        return -(sum(self.distortion.values()) + sum(self.rate.values()))


def _log_prob(site: dict) -> Tensor:
    return site["fn"].log_prob(site["value"])


def elbo_terms(model_trace: Trace, guide_trace: Trace) -> ElboTerms:
    """Decompose the ELBO of one guide sample into per-site, per-example terms."""
    terms = ElboTerms()
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            terms.distortion[name] = -per_example(_log_prob(site), site)
            continue
        guide_site = guide_trace.nodes[name]
        try:
            rate = kl_divergence(guide_site["fn"], site["fn"])
        except NotImplementedError:
            rate = _log_prob(guide_site) - _log_prob(site)
        terms.rate[name] = per_example(rate, guide_site)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or name in model_trace.nodes:
            continue
        if site["infer"].get(REGULARISER):
            terms.regulariser[name] = per_example(_log_prob(site), site)
        elif not site["is_observed"]:
            terms.rate[name] = per_example(_log_prob(site), site)
    return terms


def code_indices(guide_trace: Trace) -> dict[str, tuple[int, Tensor]]:
    """The hard code indices of every code site in a guide trace, with the site's K."""
    codes = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        while isinstance(fn, Independent):
            fn = fn.base_dist
        if isinstance(fn, CodeCategorical | CodePoint):
            codes[name] = (fn.space.num_codes, fn.space.index_of(site["value"]))
    return codes


def observed_dims(model_trace: Trace) -> int:
    """Number of observed values per data point (the denominator of bits/dim)."""
    total = 0
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            total += site["fn"].event_shape.numel()
    return total


def log_weight(model_trace: Trace, guide_trace: Trace) -> Tensor:
    """The importance log-weight ``log p(x, z) - log q(z | x)`` of the guide's sample, per example.

    Every site is scored at its sampled value (no analytic KL), so ``logsumexp`` over ``k`` draws
    minus ``log k`` is the importance-weighted bound. Training-only penalty sites are left out, and
    so are latents flagged :data:`~.family.INTEGRATES_OUT`, whose densities integrate to one.
    """

    def counts(site: dict) -> bool:
        return site["type"] == "sample" and not site["infer"].get(INTEGRATES_OUT)

    total = 0
    for name, site in model_trace.nodes.items():
        if not counts(site):
            continue
        if not site["is_observed"] and name not in guide_trace.nodes:
            raise ValueError(
                f"site {name!r}: a model latent the guide does not sample has no importance weight"
            )
        total = total + per_example(_log_prob(site), site)
    for site in guide_trace.nodes.values():
        if counts(site) and not site["is_observed"]:
            total = total - per_example(_log_prob(site), site)
    return total


def observed_means(model_trace: Trace) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, value, mean)`` of every observed site whose likelihood has a mean."""
    found = []
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"]:
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
