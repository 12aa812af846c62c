"""``score``: NVIL's score-function gradients are unbiased against the exact, enumerated gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyVAE

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


def mean_gradient(tiny, fam, x, repeats=200, chunks=30, score_scale=1.0):
    """Mean and standard error of the NVIL gradient over ``chunks`` batches of ``repeats`` copies;
    ``score_scale`` multiplies the score-function surrogate (1: probvq's estimator)."""
    elbo = fam.elbo()
    programs = fam.wrap(tiny.model, pyro_params=False), fam.wrap(tiny.guide, pyro_params=False)
    estimates = []
    for _ in range(chunks):
        parts = elbo.differentiable_parts(*programs, x.repeat(repeats, 1))
        loss = sum(
            v * (score_scale if n.endswith(".score") else 1.0)
            for found in parts.values()
            for n, v in found.items()
            if not n.endswith(".baseline")
        )
        estimates.append(gradients(tiny, fam, loss / repeats))
    estimates = torch.stack(estimates)
    return estimates.mean(0), estimates.std(0) / chunks**0.5


@pytest.mark.parametrize("running", ["fresh", "far"])
def test_score_gradients_are_unbiased_against_the_enumerated_gradient(tiny, tiny_data, running):
    """``far``: running statistics held at a mean of 50 and a variance of 100, far from the
    signal, so the centring is really exercised. Negative control: the NVIL division of the score
    term by the running sd (10 here, the old default) biases the mean gradient."""
    torch.manual_seed(0)
    fam = FAMILIES["score"].build(tiny.code_sites, {"init_var": 0.5})
    if running == "far":
        stats = fam.running["z"]
        stats.decay = 1.0  # hold the statistics where they are
        stats.mean.fill_(50.0), stats.var.fill_(100.0), stats.started.fill_(True)
    exact = gradients(tiny, fam, -exact_elbo(tiny, fam, tiny_data))
    mean, se = mean_gradient(tiny, fam, tiny_data)
    assert ((mean - exact).abs() < 5 * se + 1e-3 * exact.abs().max()).all(), (mean - exact).abs().max()
    cosine = torch.nn.functional.cosine_similarity(mean, exact, dim=0)
    assert cosine > (0.99 if running == "fresh" else 0.75), cosine
    if running == "far":
        biased, se = mean_gradient(tiny, fam, tiny_data, score_scale=0.1)
        assert not ((biased - exact).abs() < 5 * se + 1e-3 * exact.abs().max()).all()


def test_the_score_family_has_no_normalise_setting():
    with pytest.raises(ValueError, match="normalise"):
        FAMILIES["score"].build(TinyVAE().code_sites, {"normalise": True})


def test_running_statistics_decay_towards_new_signals():
    running = RunningSignal(decay=0.5)
    running.update(torch.tensor([1.0, 3.0]))
    assert float(running.mean) == 2.0 and float(running.var) == 2.0
    running.update(torch.tensor([5.0, 5.0]))
    assert float(running.mean) == 3.5 and float(running.var) == 1.0
