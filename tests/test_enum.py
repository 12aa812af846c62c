"""``enum``: the objective is -log p(x) exactly, with the exact gradient, on a model small enough."""

from __future__ import annotations

import pytest
import torch

from probvq.config import RunConfig
from probvq.inference import FAMILIES, evaluate, fit
from probvq.inference.objectives.terms import run_traces
from probvq.likelihoods import Bernoulli
from probvq.models import VQVAE


def test_the_loss_is_minus_log_p_x_and_its_gradient_the_exact_one(tiny, tiny_data):
    fam = FAMILIES["enum"].build(tiny.code_sites)
    model, guide = fam.wrap(tiny.model, pyro_params=False), fam.wrap(tiny.guide, pyro_params=False)
    elbo = fam.elbo(max_plate_nesting=1)
    exact = -tiny.log_marginal(tiny_data).sum()
    loss = elbo.differentiable_loss(model, guide, tiny_data)
    torch.testing.assert_close(loss, exact)
    parts = elbo.differentiable_parts(model, guide, tiny_data)
    split = parts["distortion"]["x"] + parts["rate"]["z"]
    torch.testing.assert_close(split, exact)
    params = [tiny.encoder.weight, tiny.decoder[0].weight, tiny.prior_logits, tiny.codebook.weight]
    want = torch.autograd.grad(exact, params[1:])
    got = torch.autograd.grad(split, params[1:])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert tiny.encoder.weight.grad is None  # no guide: the encoder takes no part


def test_evaluation_reports_the_marginal_and_the_exact_posterior_split(tiny, tiny_data):
    fam = FAMILIES["enum"].build(tiny.code_sites)
    summary = evaluate(tiny, fam, tiny_data, collapse=False)
    marginal = tiny.log_marginal(tiny_data).detach().double()
    assert summary["exact_elbo"]["mean"] == pytest.approx(float(marginal.mean()), abs=1e-5)
    assert summary["surrogate_gap"]["mean"] == 0
    total = summary["distortion"]["x"]["mean"] + summary["rate"]["z"]["mean"]
    assert total == pytest.approx(-float(marginal.mean()), abs=1e-4)
    assert summary["rate"]["z"]["mean"] >= 0
    assert 0 < summary["perplexity"]["z"] <= 3


def test_training_raises_the_marginal_likelihood(tiny, tiny_data):
    fam = FAMILIES["enum"].build(tiny.code_sites)
    before = float(tiny.log_marginal(tiny_data).sum().detach())
    config = RunConfig(max_steps=60, epochs=1000, batch_size=5, lr=1e-2, eval_every=60, quiet=True)
    fit(tiny, fam, tiny_data, tiny_data, config)
    assert float(tiny.log_marginal(tiny_data).sum().detach()) > before + 0.5


def test_a_space_too_large_is_refused_with_its_size_and_the_guide_is_refused():
    vae = VQVAE((1, 28, 28), Bernoulli(), num_codes=64, grid=7)
    with pytest.raises(ValueError, match=r"10\^88\.5 configurations \(z: 64\^49\)"):
        FAMILIES["enum"].build(vae.code_sites)
    small = VQVAE((1, 8, 8), Bernoulli(), num_codes=4, code_dim=2, grid=2, hidden=8, res_blocks=0)
    fam = FAMILIES["enum"].build(small.code_sites)  # 4^4 = 256 configurations
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="'enum' family has no guide"):
        run_traces(fam.wrap(small.model, pyro_params=False), fam.wrap(small.guide, pyro_params=False), x)
    summary = evaluate(small, fam, x, collapse=False)  # a conv model, summed over 256 configurations
    assert summary["exact_elbo"]["mean"] < 0 and summary["examples"] == 3
