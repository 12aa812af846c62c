"""The ELBO that trains probvq programs: Pyro's ``ELBO`` interface, probvq's rates.

``CodeELBO`` is what every codebook and binary family returns from ``family.elbo()``. Per guide
sample (particle) its loss is the negative ELBO of :mod:`.terms` plus the training-only penalties,
each site's term scaled and masked as Pyro does (``poutine.scale`` for KL warm-up or subsampling)::

    loss = sum_observed -log p(x | z) + sum_latent rate(q, p, z) + sum_regularisers penalty

where a latent's rate is :func:`probvq.rates.rate`: the analytic KL against logits, the chain of
conditional KLs against an autoregressive prior, ``-H(q) + F(z) + log Z`` against an energy. Pyro's
``TraceMeanField_ELBO`` would score a code site against any prior that is not logits by
``log p(k) - log q(k)`` at the relaxed sample's code, piecewise constant in the relaxed value, so
the rate's gradient would vanish without a word.

It plugs into ``pyro.infer.SVI`` like any Pyro ELBO (``loss``, ``loss_and_grads``,
``differentiable_loss``, ``num_particles``, ``vectorize_particles``, ``max_plate_nesting``), and
computes only what the objective needs: no log-density of a site whose term is analytic.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.util import check_site_shape

from probvq.priors import EnergyCodes
from probvq.rates import unwrap

from .terms import KINDS, Term, per_example, run_traces, site_terms


def surrogate_terms(
    model_trace: Trace, guide_trace: Trace, free_bits: float = 0.0, terms: list[Term] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Each site's share of the differentiable loss of one guide sample (scaled sums), by kind
    (of :data:`~.terms.KINDS`) and name.

    A latent's rate and its prior factors share the latent's name; regularisers keep their own.
    With ``free_bits`` (nats per example), each latent's rate enters as
    ``scale * B * max(free_bits, mean_b rate_b)`` over the batch of ``B`` examples (Kingma et al.
    2016): a latent whose average rate is below the floor costs a constant, so the objective no
    longer pushes it towards its prior. ``terms`` are the traces' :func:`~.terms.site_terms` when
    the caller has them already (each rate is computed once).

    A latent under an energy prior is refused with a floor: in training its ``log Z`` is a
    surrogate with value 0 (:class:`~probvq.priors.EnergyPrior`), so the floor would compare
    itself with ``KL - log Z`` rather than the KL, and once that falls below it the rate, and
    with it every gradient of the prior, would become a constant without a word.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
    floored: dict[str, tuple[torch.Tensor, object]] = {}
    for term in site_terms(model_trace, guide_trace) if terms is None else terms:
        found = parts[term.kind]
        if free_bits and term.kind == "rate":
            check_floorable(model_trace, term.name)
            masked = replace(term, node={**term.node, "scale": 1.0})
            examples = per_example(masked.scaled(), term.node)
            if term.name in floored:
                total, scale = floored[term.name]
                if not _same_scale(scale, term.node["scale"]):
                    raise ValueError(f"free_bits: the parts of {term.name!r}'s rate differ in scale")
                examples = total + examples
            floored[term.name] = (examples, term.node["scale"])
            continue
        value = term.scaled().sum()
        found[term.name] = found[term.name] + value if term.name in found else value
    for name, (examples, scale) in floored.items():
        parts["rate"][name] = scale * examples.shape[0] * examples.mean().clamp_min(free_bits)
    return parts


def check_floorable(model_trace: Trace, name: str) -> None:
    """Refuse a free-bits floor on latent ``name`` when its prior is an energy (see
    :func:`surrogate_terms`)."""
    node = model_trace.nodes.get(name)
    if node is not None and isinstance(unwrap(node["fn"])[0], EnergyCodes):
        raise ValueError(
            f"free_bits: site {name!r} has an energy prior, whose log Z is known in training only "
            "through its gradient, so a floor on its rate would compare against KL - log Z and "
            "zero the prior's gradient; train it without free_bits"
        )


def _same_scale(a: object, b: object) -> bool:
    return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))


class CodeELBO(ELBO):
    """The negative ELBO of probvq programs with value-aware rates (see the module).

    Args:
        free_bits: a floor on each latent's batch-averaged rate, in nats per example (0: none);
            see :func:`surrogate_terms`. The bounds reported by evaluation never use it.
        Others as :class:`pyro.infer.ELBO`.
    """

    free_bits_refused: str | None = None
    """Why this objective takes no free-bits floor (``None``: it takes one)."""

    def __init__(self, *args, free_bits: float = 0.0, **kwargs) -> None:
        if not (math.isfinite(free_bits) and free_bits >= 0):
            raise ValueError(f"free_bits: expected a non-negative number of nats, got {free_bits!r}")
        if free_bits and self.free_bits_refused:
            refused = self.free_bits_refused
            raise ValueError(f"free_bits: refused by {type(self).__name__}, which {refused}")
        super().__init__(*args, **kwargs)
        self.free_bits = float(free_bits)

    def _get_trace(self, model, guide, args, kwargs) -> tuple[Trace, Trace]:
        model_trace, guide_trace = run_traces(model, guide, *args, **kwargs)
        if is_validation_enabled() and self.max_plate_nesting < float("inf"):
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        # Pyro checks the log-density's shape; the batch shape is that shape,
                        # without computing a density the objective does not need.
                        shaped = {**site, "log_prob": SimpleNamespace(shape=site["fn"].batch_shape)}
                        check_site_shape(shaped, self.max_plate_nesting)
        return model_trace, guide_trace

    def differentiable_parts(self, model, guide, *args, **kwargs) -> dict[str, dict[str, torch.Tensor]]:
        """The loss split by kind and site (averaged over particles): the engine logs the rate of
        every layer from it, and it names the site of a NaN."""
        totals: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for kind, found in self.particle_parts(model_trace, guide_trace).items():
                for name, value in found.items():
                    share = value / self.num_particles
                    totals[kind][name] = totals[kind][name] + share if name in totals[kind] else share
        return totals

    def particle_parts(
        self, model_trace: Trace, guide_trace: Trace
    ) -> dict[str, dict[str, torch.Tensor]]:
        """One guide sample's parts of the loss (:func:`surrogate_terms`); subclasses add terms."""
        return surrogate_terms(model_trace, guide_trace, self.free_bits)

    def differentiable_terms(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The loss split by site (the parts of every kind, by name)."""
        terms: dict[str, torch.Tensor] = {}
        for found in self.differentiable_parts(model, guide, *args, **kwargs).values():
            for name, value in found.items():
                terms[name] = terms[name] + value if name in terms else value
        return terms

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return sum(self.differentiable_terms(model, guide, *args, **kwargs).values(), torch.tensor(0.0))

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())
