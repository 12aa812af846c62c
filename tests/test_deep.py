"""The deep top-down hierarchy against ground truth: the single-layer program, Monte Carlo,
enumeration of a tiny hierarchy, and its prior's own probabilities."""

import pyro
import pytest
import torch
from conftest import CODEBOOK_FAMILIES
from pyro import poutine
from pyro.poutine import Trace
from torch import nn

from probvq.inference import FAMILIES, evaluate, point_terms
from probvq.inference.objectives.terms import elbo_terms, run_traces
from probvq.inference.sampling import ancestral_trace, likelihood_mean
from probvq.likelihoods import Bernoulli
from probvq.models import VQVAE, DeepVAE
from probvq.models.deep import layers_per_level
from probvq.rates import unwrap
from probvq.sites import CodeSite


def tiny(num_layers, side=8, grid=2, levels=1, num_codes=4, code_dim=2, hidden=8, seed=0):
    """A small deep model whose prior heads start random (not uniform) and codebooks normal."""
    torch.manual_seed(seed)
    vae = DeepVAE(
        (1, side, side), Bernoulli(), num_layers, levels, num_codes, code_dim, grid, hidden,
        res_blocks=1, codebook_init="normal",
    )  # fmt: skip
    with torch.no_grad():
        for layer in vae.layers:
            nn.init.normal_(layer.prior_head[-1].weight, std=0.5)
            nn.init.normal_(layer.prior_head[-1].bias, std=0.5)
        vae.top.normal_()
    return vae


def family(vae, name="rr", **settings):
    spec = FAMILIES[name]
    built = spec.build(vae.code_sites, spec.resolve(settings, source="test"))
    built.eval()
    return built


def binary(n, side=8, seed=1):
    return (torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def indices(trace, name):
    fn, _ = unwrap(trace.nodes[name]["fn"])
    return fn.space.index_of(trace.nodes[name]["value"])


class _Encoder(nn.Module):
    """The deep model's layer-1 posterior path as a single-layer encoder, ``x -> (B, D, G, G)``."""

    def __init__(self, deep):
        super().__init__()
        self.deep = deep

    def forward(self, x):
        layer = self.deep.layers[0]
        h = self.deep.top.expand(x.shape[0], -1, -1, -1)
        return layer.features(h, self.deep.encoder(x)[0]).movedim(-1, 1)


class _Decoder(nn.Module):
    """The deep model's state update and decoder as a single-layer decoder of ``(B, D, G, G)``."""

    def __init__(self, deep):
        super().__init__()
        self.deep = deep

    def forward(self, z):
        h = self.deep.top.expand(z.shape[0], -1, -1, -1)
        return self.deep.decoder(self.deep.layers[0].update(h, z.movedim(1, -1)))


@pytest.mark.parametrize("name", ["rr", "sq", "vq"])
def test_one_layer_is_the_single_layer_model_with_the_same_networks(name):
    deep = tiny(1)
    single = VQVAE((1, 8, 8), Bernoulli(), 4, 2, grid=2, hidden=8, prior="learned")
    single.encoder, single.decoder = _Encoder(deep), _Decoder(deep)
    single.z = CodeSite("z1", deep.code_sites[0].space, (2, 2))
    with torch.no_grad():
        single.prior_logits.copy_(deep.layers[0].prior_logits(deep.top)[0])
    x = binary(16)
    losses = []
    for vae in (deep, single):
        fam = family(vae, name)
        fam.train()
        pyro.set_rng_seed(3)
        programs = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
        loss = fam.elbo().differentiable_loss(*programs, x)
        exact = evaluate(vae, fam, x, seed=5)["exact_elbo"]["mean"]
        losses.append((float(loss.detach()), exact))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    assert losses[0][1] == pytest.approx(losses[1][1], rel=1e-6)


def test_per_layer_kl_equals_monte_carlo():
    vae = tiny(3)
    fam = family(vae)
    draws = 4000
    x = binary(1).expand(draws, -1, -1, -1)
    model, guide = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    with torch.no_grad(), fam.exact():
        model_trace, guide_trace = run_traces(model, guide, x)
    analytic = elbo_terms(model_trace, guide_trace).rate
    for site in vae.code_sites:
        log_q = guide_trace.nodes[site.name]["fn"].log_prob(guide_trace.nodes[site.name]["value"])
        log_p = model_trace.nodes[site.name]["fn"].log_prob(model_trace.nodes[site.name]["value"])
        difference = (log_q - log_p) - analytic[site.name]  # zero mean, given the layers above
        assert analytic[site.name].mean() > 0.05, site.name  # a layer that carries information
        assert abs(difference.mean()) < 4 * difference.std() / draws**0.5 + 1e-6, site.name


def test_ancestral_samples_come_from_the_prior():
    vae = tiny(2, side=4, grid=1, num_codes=3)
    fam = family(vae)
    n = 30000
    with torch.no_grad():
        trace = poutine.trace(vae.model).get_trace(torch.zeros(n, 1, 4, 4))
        top, bottom = vae.layers
        p_top = torch.softmax(top.prior_logits(vae.top)[0, 0, 0], -1)
        joint = torch.zeros(3, 3)
        for k in range(3):
            code = top.site.space.embed_index(torch.tensor([[[k]]]))
            h = top.update(vae.top, code)
            joint[k] = p_top[k] * torch.softmax(bottom.prior_logits(h)[0, 0, 0], -1)
    pairs = indices(trace, "z2").flatten() * 3 + indices(trace, "z1").flatten()
    frequencies = torch.bincount(pairs, minlength=9).double() / n
    expected = joint.flatten().double()
    assert (frequencies - expected).abs().max() < 4 * (expected * (1 - expected) / n).sqrt().max()
    # the CLI's path: means of p(x | z) for prior draws, one per sample
    means = likelihood_mean(ancestral_trace(vae, fam, 5, (1, 4, 4), seed=0))
    assert means.shape == (5, 1, 4, 4) and ((means > 0) & (means < 1)).all()


def test_resampling_keeps_the_posterior_codes_of_the_layers_above():
    vae = tiny(3)
    fam = family(vae)
    image = binary(1)[0]
    with torch.no_grad(), fam.exact(), torch.random.fork_rng():
        torch.manual_seed(0)  # the draw ancestral_trace makes with seed 0
        guide = poutine.trace(fam.wrap(vae.guide, pyro_params=False)).get_trace(image[None])
    trace = ancestral_trace(vae, fam, 200, (1, 8, 8), seed=0, keep=["z3", "z2"], image=image)
    for name in ("z3", "z2"):
        kept = indices(trace, name)
        assert torch.equal(kept, indices(guide, name).expand_as(kept))
    redrawn = indices(trace, "z1").flatten(1)
    assert len({tuple(row.tolist()) for row in redrawn}) > 1  # layer 1 is drawn afresh
    with pytest.raises(ValueError, match=r"keep: no code sites named \['z9'\]"):
        ancestral_trace(vae, fam, 2, (1, 8, 8), keep=["z9"], image=image)


def test_per_layer_rates_sum_to_the_exact_joint_kl():
    vae = tiny(2, side=4, grid=1, num_codes=3)
    fam = family(vae)
    x = binary(1, side=4)
    model, guide = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    joint = 0.0
    with torch.no_grad(), fam.exact():
        for k in range(3):
            code = vae.code_sites[0].space.code_of_index(torch.tensor([[[k]]]))
            fixed = Trace()
            fixed.add_node("z2", type="sample", is_observed=False, value=code, infer={})
            conditioned = poutine.replay(guide, trace=fixed)
            model_trace, guide_trace = run_traces(model, conditioned, x)
            q2, p2 = (unwrap(t.nodes["z2"]["fn"])[0] for t in (guide_trace, model_trace))
            q1, p1 = (unwrap(t.nodes["z1"]["fn"])[0] for t in (guide_trace, model_trace))
            log_q2 = torch.log_softmax(q2.logits, -1).flatten()
            log_p2 = torch.log_softmax(p2.logits, -1).flatten()
            kl1 = torch.distributions.kl_divergence(q1, p1).sum()
            joint += log_q2[k].exp() * (log_q2[k] - log_p2[k] + kl1)
    draws = 20000
    points = point_terms(vae, fam, x.expand(draws, -1, -1, -1), batch_size=draws, seed=0)
    total = sum(points.rate.values())
    assert set(points.rate) == {"z1", "z2"}
    assert float(total.mean()) == pytest.approx(float(joint), abs=4 * float(total.std()) / draws**0.5)


@pytest.mark.parametrize("name", CODEBOOK_FAMILIES)
def test_thirty_two_layers_forward_and_backward(name):
    vae = tiny(32, levels=2)
    assert [s.name for s in vae.code_sites] == [f"z{n}" for n in range(32, 0, -1)]
    assert [s.grid for s in vae.code_sites] == [(2, 2)] * 16 + [(4, 4)] * 16
    fam = family(vae, name)
    fam.train()
    programs = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    loss = fam.elbo().differentiable_loss(*programs, binary(4))
    loss.backward()
    assert torch.isfinite(loss)
    for part in (vae.layers[0].prior_head[-1], vae.layers[-1].posterior_head[1], vae.encoder.stem[0]):
        assert part.weight.grad.abs().sum() > 0
    summary = evaluate(vae, fam, binary(4), seed=0)
    assert {s.name for s in vae.code_sites} <= set(summary["rate"])
    assert set(summary["surrogate_gap_by_site"]) == {"x", *summary["rate"]}


def test_layers_are_spread_over_levels_top_first():
    assert layers_per_level(32, 2) == [16, 16]
    assert layers_per_level(5, 2) == [3, 2]
    assert layers_per_level(1, 1) == [1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_layers": 33}, "num_layers: expected 1 to 32"),
        ({"num_layers": 0}, "num_layers: expected 1 to 32"),
        ({"num_layers": 2, "levels": 3}, "levels: expected 1 to num_layers=2"),
        ({"num_layers": 4, "levels": 3}, "levels: 3 resolutions from grid 2 reach 8"),
    ],
)
def test_bad_depths_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepVAE((1, 8, 8), Bernoulli(), grid=2, **kwargs)


def test_gap_by_site_sums_to_the_gap_and_vanishes_above_every_relaxation():
    """The parts sum to the gap; the top layer's part is 0, since neither its prior nor its
    posterior reads a relaxed value, and its exact cost is the hand-written categorical KL of its
    logits. (A halved KL, or a part booked under the wrong site, fails.)"""
    vae = tiny(3)
    fam = family(vae, "rr", straight_through=False)
    x = binary(64)
    points = point_terms(vae, fam, x, seed=0)
    parts = points.gap_by_site()
    assert set(parts) == {"x", "z1", "z2", "z3"}
    torch.testing.assert_close(torch.stack(list(parts.values())).sum(0), points.gap, rtol=0, atol=1e-4)
    torch.testing.assert_close(parts["z3"], torch.zeros(64), rtol=0, atol=1e-5)
    assert float(parts["z1"].abs().mean()) > 1e-3 and float(parts["x"].abs().mean()) > 1e-3
    model, guide = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    with torch.no_grad(), fam.exact():
        model_trace, guide_trace = run_traces(model, guide, x)
    log_q, log_p = (
        torch.log_softmax(unwrap(t.nodes["z3"]["fn"])[0].logits, -1) for t in (guide_trace, model_trace)
    )
    by_hand = (log_q.exp() * (log_q - log_p.expand_as(log_q))).flatten(1).sum(1)
    torch.testing.assert_close(points.rate["z3"], by_hand, rtol=1e-5, atol=1e-5)
