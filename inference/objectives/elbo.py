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

from types import SimpleNamespace

import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.util import check_site_shape

from .terms import run_traces, site_terms


def surrogate_terms(model_trace: Trace, guide_trace: Trace) -> dict[str, torch.Tensor]:
    """Each site's share of the differentiable loss of one guide sample (scaled sums), by name.

    A latent's rate and its prior factors share the latent's name; regularisers keep their own.
    """
    terms: dict[str, torch.Tensor] = {}
    for term in site_terms(model_trace, guide_trace):
        value = term.scaled().sum()
        terms[term.name] = terms[term.name] + value if term.name in terms else value
    return terms


class CodeELBO(ELBO):
    """The negative ELBO of probvq programs with value-aware rates (see the module)."""

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

    def differentiable_terms(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The loss split by site (averaged over particles): what names the site of a NaN."""
        totals: dict[str, torch.Tensor] = {}
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for name, value in surrogate_terms(model_trace, guide_trace).items():
                share = value / self.num_particles
                totals[name] = totals[name] + share if name in totals else share
        return totals

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
