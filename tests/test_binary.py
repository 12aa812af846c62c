"""Binary latent units under the ``bernoulli`` family: training, exact mode, and the diagnostics
(exact ELBO, IWAE, PSIS) unchanged, checked against enumeration of all 2^4 latent states."""

import itertools
from contextlib import nullcontext

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

from probvq import DATA_PLATE, BinaryUnits, CodeSite, EnergyPrior, code
from probvq.config import RunConfig
from probvq.inference import RelaxedBernoulli, diagnose, evaluate, fit, run_traces
from probvq.inference.objectives.importance import iwae_bound, log_weights

UNITS, X = 4, 8


class BinaryVAE(nn.Module):
    """h in {0,1}^4 with a factorial prior (learned logits) -> x in {0,1}^8."""

    def __init__(self):
        super().__init__()
        self.h = CodeSite("h", BinaryUnits(), (UNITS,))
        self.prior_logit = nn.Parameter(torch.zeros(UNITS))
        self.decoder = nn.Sequential(nn.Linear(UNITS, 16), nn.Tanh(), nn.Linear(16, X))
        self.encoder = nn.Sequential(nn.Linear(X, 16), nn.Tanh(), nn.Linear(16, UNITS))

    @property
    def code_sites(self):
        return [self.h]

    def prior(self, batch):
        logits = torch.stack([torch.zeros_like(self.prior_logit), self.prior_logit], -1)
        return logits.expand(batch, UNITS, 2)

    def model(self, x):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            h = code(self.h, self.prior(x.shape[0]))
            pyro.sample("x", pyro.distributions.Bernoulli(logits=self.decoder(h)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            code(self.h, self.prior(x.shape[0]), features=self.encoder(x))

    def log_marginal(self, x):
        states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=UNITS)))
        rows = []
        for state in states:
            conditioned = poutine.condition(self.model, data={"h": state.expand(len(x), UNITS)})
            trace = poutine.trace(conditioned).get_trace(x)
            trace.compute_log_prob()
            rows.append(trace.nodes["h"]["log_prob"] + trace.nodes["x"]["log_prob"])
        return torch.logsumexp(torch.stack(rows), 0)


def data(n=256):
    pattern = torch.bernoulli(torch.full((4, X), 0.5))
    return pattern[torch.randint(4, (n,))]


@pytest.mark.parametrize("straight_through", [False, True])
def test_the_bernoulli_family_trains_binary_units(straight_through):
    vae, x = BinaryVAE(), data()
    family = RelaxedBernoulli(vae.code_sites, straight_through=straight_through)
    before = evaluate(vae, family, x)["exact_elbo"]["mean"]
    config = RunConfig(max_steps=300, lr=1e-2, batch_size=32, eval_every=300, valid_size=256, quiet=True)
    fit(vae, family, x, x, config)
    after = evaluate(vae, family, x)["exact_elbo"]["mean"]
    assert after > before + 1.0, (before, after)


def test_exact_mode_draws_hard_units_with_exact_log_q():
    vae = BinaryVAE()
    family = RelaxedBernoulli(vae.code_sites, straight_through=False)
    x = data(4000)
    with torch.no_grad():
        relaxed = run_traces(family.wrap(vae.model), family.wrap(vae.guide), x)[1]
        with family.exact():
            hard = run_traces(family.wrap(vae.model), family.wrap(vae.guide), x)[1]
    soft_h, hard_h = relaxed.nodes["h"]["value"], hard.nodes["h"]["value"]
    assert ((soft_h > 0) & (soft_h < 1)).all() and set(hard_h.unique().tolist()) == {0.0, 1.0}
    probs = torch.sigmoid(vae.encoder(x)).detach()
    # the hard units are Bernoulli(q) draws, and log q is the exact Bernoulli log-probability
    torch.testing.assert_close(hard_h.mean(0), probs.mean(0), atol=0.02, rtol=0)
    expected = torch.distributions.Bernoulli(probs).log_prob(hard_h).sum(-1)
    torch.testing.assert_close(hard.nodes["h"]["fn"].log_prob(hard_h), expected)


def test_iwae_of_binary_units_approaches_the_enumerated_log_marginal():
    vae, x = BinaryVAE(), data(6)
    family = RelaxedBernoulli(vae.code_sites)
    with torch.no_grad():
        exact = vae.log_marginal(x)
        with family.exact():
            model, guide = family.wrap(vae.model), family.wrap(vae.guide)
            log_w = next(log_weights(model, guide, x, 5000, 30_000))
    bound = iwae_bound(log_w)
    assert (bound - exact.double()).abs().max() < 0.02


def test_diagnostics_run_unchanged_on_binary_units():
    vae, x = BinaryVAE(), data(40)
    summary = diagnose(vae, RelaxedBernoulli(vae.code_sites), x, k=100, memory_mib=16).summary()
    assert summary["num_codes"] == {"h": 2}
    assert summary["iwae"]["mean"] >= summary["exact_elbo"]["mean"] - 3 * summary["exact_elbo"]["se"]
    assert summary["pareto_khat"]["points"] == 40


@pytest.mark.parametrize("mode", ["straight_through", "exact"])
def test_an_energy_prior_gets_the_enumerated_gradient(mode):
    """Under a pairwise energy ``F(h) = -h.b - h^T W h`` with an exact ``log Z``, the loss's
    gradient with respect to ``b`` and ``W`` is, on average over draws, that of the enumerated
    ``E_q[F(h)] + log Z`` (summed over the batch), with hard units forward (straight-through in
    training, or exact mode). Per-example gradients have sd <= 0.5 per entry, which sets the
    tolerance; dropping ``log Z`` or halving ``F`` moves the sum by thousands of those."""
    torch.manual_seed(0)
    vae = BinaryVAE()
    bias = nn.Parameter(torch.randn(UNITS))
    pairs = nn.Parameter(torch.randn(UNITS, UNITS).triu(1))
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=UNITS)))

    def energy(h):
        return -(h @ bias) - ((h @ pairs) * h).sum(-1)

    vae.prior = lambda _batch: EnergyPrior(energy, torch.logsumexp(-energy(states), 0))
    family = RelaxedBernoulli(vae.code_sites, straight_through=mode == "straight_through")
    draws = 20000
    x = data(1).expand(draws, -1)
    with family.exact() if mode == "exact" else nullcontext():
        loss = family.elbo().differentiable_loss(family.wrap(vae.model), family.wrap(vae.guide), x)
    found = torch.autograd.grad(loss, [bias, pairs])
    with torch.no_grad():
        on = torch.sigmoid(vae.encoder(x[:1]))[0]
    q = (states * on + (1 - states) * (1 - on)).prod(-1)  # q(h) for every state
    expected_rate = (q * energy(states)).sum() + torch.logsumexp(-energy(states), 0)
    expected = torch.autograd.grad(draws * expected_rate, [bias, pairs])
    tolerance = 5 * 0.5 * draws**0.5
    for name, got, want in zip(("b", "W"), found, expected, strict=True):
        want = want.triu(1) if name == "W" else want
        got = got.triu(1) if name == "W" else got
        assert (got - want).abs().max() < tolerance, (name, got, want)
        assert want.abs().max() > 10 * tolerance, (name, want)


def test_the_bernoulli_family_refuses_codebooks_and_groups_and_bad_features():
    from probvq import Codebook, CodeGroup

    with pytest.raises(ValueError, match="infers BinaryUnits sites"):
        RelaxedBernoulli([CodeSite("z", Codebook(3, 2), (2,))])
    vae = BinaryVAE()
    family = RelaxedBernoulli(vae.code_sites)
    with pytest.raises(ValueError, match=r"expects features \(\*batch, 4\)"):
        family.wrap(code)(vae.h, vae.prior(2), features=torch.zeros(2, UNITS, 2))
    sites = [CodeSite("a", BinaryUnits(), (2,)), CodeSite("b", BinaryUnits(), (2,))]
    group = CodeGroup("g", sites)
    stacked = RelaxedBernoulli(sites).wrap(code)
    prior = torch.zeros(3, 2, 2)
    with pytest.raises(ValueError, match="no residual"):
        stacked(group, [prior, prior], features=torch.zeros(3, 2))
