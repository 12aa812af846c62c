"""``score``: NVIL's score-function gradients are unbiased against the exact, enumerated gradient."""

from __future__ import annotations

import pytest
import torch

from probvq.inference import FAMILIES
from probvq.inference.objectives.score import RunningSignal
from probvq.inference.objectives.terms import run_traces


def exact_elbo(tiny, fam, x):
    """``sum_b sum_z q(z | x_b) [log p(x_b, z) - log q(z | x_b)]`` over all K^N codes."""
    guide_trace = run_traces(
        fam.wrap(tiny.model, pyro_params=False), fam.wrap(tiny.guide, pyro_params=False), x
    )[1]
    log_q_pos = torch.log_softmax(guide_trace.nodes["z"]["fn"].base_dist.logits, -1)  # (B, N, K)
    configs = tiny.configurations()  # (C, N)
    log_q = log_q_pos[:, torch.arange(configs.shape[1]), configs].sum(-1).T  # (C, B)
    return (log_q.exp() * (tiny.log_joint(x) - log_q)).sum()


def gradients(tiny, fam, loss):
    params = [tiny.encoder.weight, tiny.codebook.weight, tiny.decoder[0].weight]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("normalise", [False, True])
def test_score_gradients_are_unbiased_against_the_enumerated_gradient(tiny, tiny_data, normalise):
    torch.manual_seed(0)
    fam = FAMILIES["score"].build(tiny.code_sites, {"normalise": normalise, "init_var": 0.5})
    exact = gradients(tiny, fam, -exact_elbo(tiny, fam, tiny_data))
    elbo = fam.elbo()
    programs = fam.wrap(tiny.model, pyro_params=False), fam.wrap(tiny.guide, pyro_params=False)
    repeats, chunks = 200, 30
    x = tiny_data.repeat(repeats, 1)
    estimates = []
    for _ in range(chunks):
        parts = elbo.differentiable_parts(*programs, x)
        loss = sum(
            v for kind, found in parts.items() for n, v in found.items() if not n.endswith(".baseline")
        )
        estimates.append(gradients(tiny, fam, loss / repeats))
    estimates = torch.stack(estimates)
    if normalise:  # a positive rescaling per step: compare directions
        estimates = estimates / estimates.norm(dim=1, keepdim=True) * exact.norm()
    mean, se = estimates.mean(0), estimates.std(0) / chunks**0.5
    assert ((mean - exact).abs() < 5 * se + 1e-3 * exact.abs().max()).all(), (mean - exact).abs().max()
    assert (mean - exact).norm() < 0.1 * exact.norm()


def test_running_statistics_decay_towards_new_signals():
    running = RunningSignal(decay=0.5)
    running.update(torch.tensor([1.0, 3.0]))
    assert float(running.mean) == 2.0 and float(running.var) == 2.0
    running.update(torch.tensor([5.0, 5.0]))
    assert float(running.mean) == 3.5 and float(running.var) == 1.0
