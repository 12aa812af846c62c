"""Score-function gradients for exact discrete samples (NVIL: Mnih and Gregor 2014).

For a guide site whose sample is exact (no reparameterisation), the gradient of the expected cost
``E_q[c(x, z)]`` with respect to q's parameters is ``E_q[(c(x, z) - b(x)) grad log q(z | x)]`` for any
baseline ``b`` that does not depend on ``z`` (it only lowers the variance). :class:`ScoreELBO` adds,
per such site and example, the surrogate

    sg(c - b) * log q(z | x)     and     (sg(c) - b)^2   (the baseline's own regression loss)

to :class:`~.elbo.CodeELBO`'s loss, whose analytic terms keep their exact gradients (the decoder's,
the prior's and each site's own KL). As in NVIL, a site may also carry :class:`RunningSignal`
statistics: the signal is then centred by its running mean (of earlier steps: independent of this
step's z, so unbiased) before the learned baseline fits what is left. NVIL also divides the centred
signal by its running standard deviation; here that would scale the score-function part of the
encoder's gradient and not the pathwise part from the analytic KL, so the step would no longer
point along the ELBO's gradient (measured: cosine -0.14 with the enumerated gradient at a running
sd of 10), and it is not done. The learning signal ``c`` of a site is the example's whole cost
(distortion and every rate, as scaled in the loss), less that site's own rate where that rate is
a function of q's parameters alone (the analytic KL against a prior given as logits). Against an
autoregressive or energy prior the rate depends on the sample (through the context, or ``F(z)``)
and stays in the signal: leaving it out would bias the gradient. A site carries its baseline the
way Pyro's ``TraceGraph_ELBO`` reads it: ``infer={"baseline": {"baseline_value": b}}`` with ``b``
shaped like the batch. Both surrogates are reported as regularisers ``<site>.score`` and
``<site>.baseline``.
"""

from __future__ import annotations

import torch
from pyro.poutine import Trace
from torch import Tensor, nn

from probvq.codes import CodeCategorical
from probvq.rates import unwrap

from .elbo import CodeELBO, surrogate_terms
from .terms import per_example, site_terms


def _analytic(model_trace: Trace, name: str) -> bool:
    """Whether latent ``name``'s rate is independent of its sample: a prior given as logits."""
    node = model_trace.nodes.get(name)
    return node is not None and isinstance(unwrap(node["fn"])[0], CodeCategorical)


class RunningSignal(nn.Module):
    """Exponentially decaying mean and variance of a site's learning signal (NVIL's centring and
    variance normalisation); a module, so it saves and moves with its family."""

    def __init__(self, decay: float = 0.9) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("var", torch.tensor(1.0))
        self.register_buffer("started", torch.tensor(False))

    @torch.no_grad()
    def update(self, signal: Tensor) -> None:
        mean, var = signal.mean(), signal.var() if signal.numel() > 1 else signal.new_zeros(())
        if not bool(self.started):
            self.mean.copy_(mean)
            self.var.copy_(var)
            self.started.fill_(True)
            return
        self.mean.lerp_(mean, 1 - self.decay)
        self.var.lerp_(var, 1 - self.decay)


class ScoreELBO(CodeELBO):
    """:class:`~.elbo.CodeELBO` plus score-function surrogates at sites that carry a baseline."""

    free_bits_refused = (
        "learns from per-example signals that hold the rates of sample-dependent sites; a floor "
        "on a batch's mean rate is no per-example cost, so the score-function gradient of the "
        "floored objective is not what it computes"
    )

    def particle_parts(
        self, model_trace: Trace, guide_trace: Trace
    ) -> dict[str, dict[str, torch.Tensor]]:
        terms = list(site_terms(model_trace, guide_trace))
        parts = surrogate_terms(model_trace, guide_trace, self.free_bits, terms)
        cost, own = 0.0, {}
        for term in terms:
            if term.kind == "regulariser":
                continue
            value = per_example(term.scaled(), term.node)
            cost = cost + value
            if term.kind == "rate" and _analytic(model_trace, term.name):
                own[term.name] = own.get(term.name, 0.0) + value
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or "baseline" not in site["infer"]:
                continue
            baseline = site["infer"]["baseline"]["baseline_value"]
            running: RunningSignal | None = site["infer"]["baseline"].get("running")
            signal = (cost - own.get(name, 0.0)).detach()
            centred = signal
            if running is not None:  # statistics of earlier steps only: independent of this z
                centred = signal - running.mean
                if torch.is_grad_enabled():
                    running.update(signal)
            log_q = per_example(site["fn"].log_prob(site["value"]), site)
            residual = centred - baseline
            parts["regulariser"][f"{name}.score"] = (residual.detach() * log_q).sum()
            parts["regulariser"][f"{name}.baseline"] = residual.pow(2).sum()
        return parts
