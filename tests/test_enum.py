"""``enum``: the objective is -log p(x) exactly, with the exact gradient, on a model small enough."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from probvq import DATA_PLATE, Codebook, CodeSite, code
from probvq.config import RunConfig
from probvq.inference import FAMILIES, evaluate, fit
from probvq.inference.objectives.enumerate import enumerate_model
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


def test_the_training_parts_keep_the_exact_gradient_when_posterior_weights_underflow(tiny, tiny_data):
    """A prior 200 nats against two codes: their posterior weights are 0 in float32. The split
    parts must still sum to -log p(x) with its gradient; the split written with ``xlogy(w, w)``
    (the old form, a negative control) has NaN gradients there."""
    with torch.no_grad():
        tiny.prior_logits.copy_(torch.tensor([[200.0, 0.0, 0.0], [0.0, 200.0, 0.0]]))
    fam = FAMILIES["enum"].build(tiny.code_sites)
    model, guide = fam.wrap(tiny.model, pyro_params=False), fam.wrap(tiny.guide, pyro_params=False)
    elbo = fam.elbo(max_plate_nesting=1)
    found = enumerate_model(model, tiny.code_sites, tiny_data, 4096)
    assert (found.posterior == 0).any()
    params = [tiny.decoder[0].weight, tiny.prior_logits, tiny.codebook.weight]
    exact = -tiny.log_marginal(tiny_data).sum()
    parts = elbo.differentiable_parts(model, guide, tiny_data)
    split = parts["distortion"]["x"] + parts["rate"]["z"]
    torch.testing.assert_close(split, exact)
    want = torch.autograd.grad(exact, params)
    for got, expected in zip(torch.autograd.grad(split, params), want, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected)
    w = found.posterior
    old = -(w * found.log_likelihood).sum() + (torch.special.xlogy(w, w) - w * found.log_prior).sum()
    assert not all(torch.isfinite(g).all() for g in torch.autograd.grad(old, params))


def test_fit_trains_a_mixture_whose_posterior_weights_underflow():
    """The issue's case: a 2-D Gaussian mixture with K = 8 at lr 0.05 stopped at step 139 on NaN."""
    torch.manual_seed(0)
    book = Codebook(8, 2, init="normal")
    site = CodeSite("z", book, (1,))

    class Mixture(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codebook, self.z = book, site
            self.logits = torch.nn.Parameter(torch.zeros(1, 8))
            self.log_scale = torch.nn.Parameter(torch.tensor(-1.0))

        @property
        def code_sites(self):
            return [self.z]

        def model(self, x):
            with pyro.plate(DATA_PLATE, x.shape[0]):
                z = code(self.z, self.logits.expand(x.shape[0], 1, 8))
                pyro.sample("x", dist.Normal(z[:, 0], self.log_scale.exp()).to_event(1), obs=x)

        def guide(self, x):
            pass

    centres = 6 * torch.randn(8, 2)
    x = centres[torch.randint(8, (400,))] + 0.1 * torch.randn(400, 2)
    vae = Mixture()
    fam = FAMILIES["enum"].build(vae.code_sites)
    config = RunConfig(max_steps=300, epochs=1000, batch_size=100, lr=0.05, eval_every=300, quiet=True)
    with torch.no_grad():
        before = evaluate(vae, fam, x, collapse=False)["exact_elbo"]["mean"]
    fit(vae, fam, x, x, config)  # the old split stopped on non-finite gradients
    after = evaluate(vae, fam, x, collapse=False)["exact_elbo"]["mean"]
    assert after > before + 10, (before, after)


def test_pyros_loss_interface_gives_minus_log_p_x_and_its_exact_gradient(tiny, tiny_data):
    # What pyro.infer.SVI calls: loss (evaluate_loss) and loss_and_grads (step).
    fam = FAMILIES["enum"].build(tiny.code_sites)
    model, guide = fam.wrap(tiny.model, pyro_params=False), fam.wrap(tiny.guide, pyro_params=False)
    elbo = fam.elbo(max_plate_nesting=1)
    exact = -tiny.log_marginal(tiny_data).sum()
    params = [tiny.decoder[0].weight, tiny.prior_logits, tiny.codebook.weight]
    want = torch.autograd.grad(exact, params)
    assert elbo.loss(model, guide, tiny_data) == pytest.approx(float(exact.detach()), rel=1e-6)
    assert elbo.loss_and_grads(model, guide, tiny_data) == pytest.approx(float(exact.detach()), rel=1e-6)
    for param, grad in zip(params, want, strict=True):
        torch.testing.assert_close(param.grad, grad)


def test_usage_is_the_posteriors_expected_code_counts_over_every_batch(tiny, tiny_data):
    fam = FAMILIES["enum"].build(tiny.code_sites)
    summary = evaluate(tiny, fam, tiny_data, batch_size=2, collapse=False)  # batches of 2, 2 and 1
    with torch.no_grad():
        posterior = torch.softmax(tiny.log_joint(tiny_data), 0).double()  # (K^N, B)
    onehot = torch.nn.functional.one_hot(tiny.configurations(), 3).sum(1).double()  # (K^N, K)
    usage = (posterior.sum(1)[:, None] * onehot).sum(0)
    p = usage / usage.sum()
    assert summary["perplexity"]["z"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
