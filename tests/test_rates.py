"""Rates against ground truth, for every family and every kind of prior, on sites small enough to
enumerate: 3 positions with K = 3 codes of D = 2, and 4 binary units.

For each case the mean over many guide draws of probvq's rate, and of its gradient with respect to
the encoder features, the family's variances, the codebook and the prior's parameters, is compared
with the truth:

* exact hard codes (``family.exact()``), and the straight-through relaxation whose forward values
  are hard: the rate's mean is ``KL(q || p)``, summed over all K^N configurations, and so is its
  gradient in the prior's parameters (the draw does not depend on them);
* soft Concrete relaxation: the relaxed objective of :mod:`probvq.rates`, the same expression at the
  relaxed value, whose expectation over the Gumbel (or logistic) noise is computed by Gauss-Legendre
  quadrature, gradients included (the integrand is differentiable in every parameter);
* hard VQ: a point mass, so the truth is the rate of the nearest codes written by hand, with the
  straight-through value as the autoregressive prior's context.

Priors: logits; a first-order autoregressive prior (a proper one: each position's logits read the
previous position's value); the logits wrapped as an opaque autoregressive object; and, over binary
units, an RBM free energy with ``log Z`` by enumeration.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyro
import pytest
import torch
from torch import nn

from probvq import (
    DATA_PLATE,
    AutoregressivePrior,
    BinaryUnits,
    Codebook,
    CodeCategorical,
    CodeSite,
    Concrete,
    EnergyPrior,
    code,
)
from probvq.inference import FAMILIES, RR, SQ, VQ, RelaxedBernoulli, elbo_terms, run_traces

TAU = 0.8


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Markov(AutoregressivePrior):
    """``logits_n = a_n + W v_{n-1}`` (``v_{-1} = 0``): causal in the row-major order."""

    def __init__(self, positions: int, num_codes: int, value_dim: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(positions, num_codes))
        self.W = nn.Parameter(torch.randn(num_codes, value_dim))

    def position_logits(self, n: int, previous: torch.Tensor | None) -> torch.Tensor:
        """Logits of position n given the previous position's value ``(..., value_dim)``."""
        return self.a[n] if previous is None else self.a[n] + previous @ self.W.T

    def conditional_logits(self, value):
        flat = value.reshape(*value.shape[:2], -1)
        previous = torch.cat([torch.zeros_like(flat[:, :1]), flat[:, :-1]], 1)
        return self.a + previous @ self.W.T


class Opaque(AutoregressivePrior):
    """Fixed logits behind the autoregressive interface."""

    def __init__(self, logits: nn.Parameter):
        super().__init__()
        self.logits = logits

    def conditional_logits(self, value):
        return self.logits.expand(*value.shape[:2], *self.logits.shape[1:])


class RBM(nn.Module):
    """``F(h) = -b.h - sum_j softplus(c_j + W_j.h)`` over 4 units, 3 hidden; exact ``log Z``."""

    def __init__(self, units: int = 4, hidden: int = 3):
        super().__init__()
        self.b = nn.Parameter(0.5 * torch.randn(units))
        self.c = nn.Parameter(0.5 * torch.randn(hidden))
        self.W = nn.Parameter(0.5 * torch.randn(hidden, units))

    def energy(self, h):
        return -(h @ self.b) - nn.functional.softplus(self.c + h @ self.W.T).sum(-1)

    def log_z(self):
        states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=self.b.numel())))
        return torch.logsumexp(-self.energy(states), 0)


class CodeEnergy(nn.Module):
    """``F(v) = -a.v - sum_j softplus(c_j + W_j.v)`` over the values of 3 positions of D = 2 (the
    flattened grid), with ``log Z`` over the K^N configurations of ``space``."""

    def __init__(self, space: Codebook, positions: int = 3, hidden: int = 2):
        super().__init__()
        self.spaces, self.positions = [space], positions  # in a list: not a parameter of the prior
        self.a = nn.Parameter(0.5 * torch.randn(positions * 2))
        self.c = nn.Parameter(0.5 * torch.randn(hidden))
        self.W = nn.Parameter(0.5 * torch.randn(hidden, positions * 2))

    def energy(self, v):
        flat = v.flatten(-2)
        return -(flat @ self.a) - nn.functional.softplus(self.c + flat @ self.W.T).sum(-1)

    def log_z(self):
        configs = torch.tensor(list(itertools.product(range(3), repeat=self.positions)))
        return torch.logsumexp(-self.energy(self.spaces[0].embed_index(configs)), 0)


class Case:
    """A site, its features, a family and a prior, and the parameters the gradients are taken in."""

    def __init__(self, family: str, prior: str, binary: bool, seed: int = 0):
        torch.manual_seed(seed)
        if binary:
            self.space, self.grid = BinaryUnits(), (4,)
            self.features = nn.Parameter(torch.randn(4))
            value_dim = 1
        else:
            self.space, self.grid = Codebook(3, 2, init="normal"), (3,)
            self.features = nn.Parameter(torch.randn(3, 2))
            value_dim = 2
        self.site = CodeSite("z", self.space, self.grid)
        n, k = self.grid[0], self.space.num_codes
        self.logits = torch.zeros(n, k) if prior == "uniform" else nn.Parameter(torch.randn(n, k))
        self.prior_kind = prior
        self.prior_module = {
            "logits": None,
            "uniform": None,
            "markov": Markov(n, k, value_dim),
            "opaque": Opaque(self.logits),
            "energy": RBM() if binary else CodeEnergy(self.space),
        }[prior]
        self.family = self.make_family(family)

    def make_family(self, name: str, straight_through: bool = False):
        relaxed = {"temperature": TAU, "temperature_min": TAU, "straight_through": straight_through}
        if name == "vq":
            return VQ([self.site])
        if name == "bernoulli":
            return RelaxedBernoulli([self.site], **relaxed)
        if name == "gumbel":
            return FAMILIES["gumbel"].cls([self.site], **relaxed)
        if name == "score":  # exact codes in training: nothing to relax
            family = FAMILIES["score"].cls([self.site], init_var=0.6)
        else:
            family = {"sq": SQ, "rr": RR}[name]([self.site], init_var=0.6, **relaxed)
        with torch.no_grad():
            for p in family.parameters():
                p.add_(0.2 * torch.randn_like(p))
        return family

    # -- parameters --------------------------------------------------------------------------

    def prior_parameters(self) -> list[nn.Parameter]:
        if self.prior_kind in ("logits", "opaque"):
            return [self.logits]
        if self.prior_kind == "uniform":
            return []
        return list(self.prior_module.parameters())

    def parameters(self) -> list[nn.Parameter]:
        own = [self.features, *self.family.parameters(), *self.space.parameters()]
        return own + self.prior_parameters()

    # -- probvq's side -------------------------------------------------------------------------

    def prior(self, batch: int):
        if self.prior_kind in ("logits", "uniform"):
            return self.logits.expand(batch, *self.logits.shape)
        if self.prior_kind == "energy":
            rbm = self.prior_module
            return EnergyPrior(rbm.energy, rbm.log_z())
        return self.prior_module

    def rates(self, batch: int) -> torch.Tensor:
        """probvq's rate of ``batch`` guide draws."""

        def model():
            with pyro.plate(DATA_PLATE, batch):
                code(self.site, self.prior(batch))

        def guide():
            with pyro.plate(DATA_PLATE, batch):
                features = self.features.expand(batch, *self.features.shape)
                code(self.site, self.prior(batch), features=features)

        family = self.family
        traces = run_traces(family.wrap(model), family.wrap(guide))
        return elbo_terms(*traces).rate["z"]

    def monte_carlo(self, chunks: int = 16, draws: int = 4096):
        """Mean rate and mean gradients over ``chunks x draws`` draws, each with its standard error."""
        params = self.parameters()
        values, grads = [], []
        for _ in range(chunks):
            mean = self.rates(draws).mean()
            values.append(mean.detach())
            grads.append(torch.autograd.grad(mean, params, allow_unused=True))
        value = torch.stack(values)
        found = [(value.mean(), value.std() / chunks**0.5)]
        for i, p in enumerate(params):
            stacked = torch.stack([g[i] if g[i] is not None else torch.zeros_like(p) for g in grads])
            found.append((stacked.mean(0), stacked.std(0) / chunks**0.5))
        return found

    # -- the truth -------------------------------------------------------------------------------

    def q_logits(self) -> torch.Tensor:
        """The family's q, written by hand: logits ``(N, K)``."""
        family = self.family
        if isinstance(self.space, BinaryUnits):  # bernoulli and score: the features are logits
            return torch.stack([torch.zeros_like(self.features), self.features], -1)
        if family.name == "gumbel":
            return family.readout["z"](self.features)
        book = self.space.weight
        distances = (self.features.unsqueeze(-2) - book).pow(2).sum(-1)
        log_var = family.log_var["z"]
        if family.name in ("sq", "score"):
            return -distances / (2 * log_var.exp())
        return self.logits.log_softmax(-1) - log_var - distances / (2 * log_var.exp())  # RR, D = 2

    def embed(self, weights: torch.Tensor) -> torch.Tensor:
        """Values ``(..., value_dim)`` of weights ``(..., K)``."""
        if isinstance(self.space, BinaryUnits):
            return weights[..., 1:]
        return weights @ self.space.weight

    def prior_log_probs(self, configs: torch.Tensor) -> torch.Tensor:
        """``log p(c)`` of hard configurations ``(C, N)``."""
        k = self.space.num_codes
        weights = nn.functional.one_hot(configs, k).to(torch.float64)
        if self.prior_kind == "energy":
            energy = self.prior_module
            values = weights[..., 1] if isinstance(self.space, BinaryUnits) else self.embed(weights)
            return -energy.energy(values) - energy.log_z()
        if self.prior_kind == "markov":
            values = self.embed(weights)
            logits = torch.stack(
                [
                    self.prior_module.position_logits(n, values[:, n - 1] if n else None).expand(
                        len(configs), k
                    )
                    for n in range(configs.shape[1])
                ],
                1,
            )
        else:
            logits = self.logits.expand(len(configs), *self.logits.shape)
        return (logits.log_softmax(-1) * weights).sum((-1, -2))

    def enumerated_kl(self) -> torch.Tensor:
        """``KL(q || p)`` over all ``K^N`` configurations."""
        n, k = self.grid[0], self.space.num_codes
        configs = torch.tensor(list(itertools.product(range(k), repeat=n)))
        log_q_positions = self.q_logits().log_softmax(-1)
        log_q = log_q_positions[torch.arange(n), configs].sum(-1)
        return (log_q.exp() * (log_q - self.prior_log_probs(configs))).sum()

    def relaxed_objective(self, points: int) -> torch.Tensor:
        """The soft relaxed rate's expectation over the noise, by Gauss-Legendre quadrature."""
        q = self.q_logits()
        log_q = q.log_softmax(-1)
        if self.prior_kind in ("logits", "opaque", "uniform"):
            return (log_q.exp() * (log_q - self.logits.log_softmax(-1))).sum()
        if self.prior_kind == "energy":
            u, w = gauss_legendre(points, self.grid[0])
            h = torch.sigmoid((self.features + torch.log(u / (1 - u))) / TAU)
            entropy = -(log_q.exp() * log_q).sum()
            rbm = self.prior_module
            return -entropy + (w * rbm.energy(h)).sum() + rbm.log_z()
        u, w = gauss_legendre(points, self.space.num_codes)
        gumbel = -torch.log(-torch.log(u))
        total = 0.0
        for n in range(self.grid[0]):
            if n == 0:
                p = self.prior_module.position_logits(0, None)
                total = total + (log_q[0].exp() * (log_q[0] - p.log_softmax(-1))).sum()
                continue
            context = self.embed(torch.softmax((q[n - 1] + gumbel) / TAU, -1))
            p = self.prior_module.position_logits(n, context).log_softmax(-1)
            total = total + (w * (log_q[n].exp() * (log_q[n] - p)).sum(-1)).sum()
        return total

    def vq_rate(self) -> torch.Tensor:
        """Hard VQ's rate written by hand, the straight-through value as the prior's context."""
        book = self.space.weight
        index = (self.features.unsqueeze(-2) - book).pow(2).sum(-1).argmin(-1)
        value = self.features + (book[index] - self.features).detach()
        if self.prior_kind == "energy":
            return self.prior_module.energy(value) + self.prior_module.log_z()
        if self.prior_kind == "markov":
            logits = torch.stack(
                [
                    self.prior_module.position_logits(n, value[n - 1] if n else None)
                    for n in range(len(index))
                ]
            )
        else:
            logits = self.logits
        return -logits.log_softmax(-1)[torch.arange(len(index)), index].sum()


def gauss_legendre(points: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``(points^dims, dims)`` in ``(0, 1)^dims`` and their weights."""
    x, w = np.polynomial.legendre.leggauss(points)
    u, w = torch.tensor((x + 1) / 2), torch.tensor(w / 2)
    nodes = torch.cartesian_prod(*[u] * dims).reshape(-1, dims)
    weights = torch.cartesian_prod(*[w] * dims).reshape(-1, dims).prod(-1)
    return nodes, weights


def truth_and_gradients(case: Case, objective: torch.Tensor, exact_gradients: list[nn.Parameter]):
    params = case.parameters()
    grads = torch.autograd.grad(objective, exact_gradients, allow_unused=True) if exact_gradients else ()
    known = {
        id(p): g if g is not None else torch.zeros_like(p)
        for p, g in zip(exact_gradients, grads, strict=True)
    }
    return [objective.detach()] + [known.get(id(p)) for p in params]


def assert_agrees(found, truth, label):
    names = ["rate"] + [f"gradient {i}" for i in range(len(found) - 1)]
    for name, (mean, se), expected in zip(names, found, truth, strict=True):
        if expected is None:
            continue
        tolerance = 4.5 * se + 1e-6 + 1e-5 * expected.abs()
        assert torch.all((mean - expected).abs() <= tolerance), (label, name, mean, expected, se)


PRIORS = ("uniform", "logits", "markov", "opaque", "energy")
CODEBOOK_CASES = [
    (family, prior)
    for family in ("sq", "rr", "gumbel")
    for prior in PRIORS
    if not (family == "rr" and prior in ("markov", "opaque", "energy"))  # refused (a test below)
]
BINARY_CASES = [("bernoulli", prior) for prior in PRIORS]
RELAXED_CASES = [(f, p, False) for f, p in CODEBOOK_CASES] + [(f, p, True) for f, p in BINARY_CASES]
EXACT_CASES = RELAXED_CASES + [("score", prior, binary) for binary in (False, True) for prior in PRIORS]
SOFT_CASES = [case for case in RELAXED_CASES if case[1:] != ("energy", False)]
"""The soft relaxation of an energy over codebook values has no quadrature of feasible size (K = 3
Gumbel dimensions per position); binary units need one logistic dimension per unit."""


@pytest.mark.parametrize(("family", "prior", "binary"), EXACT_CASES)
def test_exact_codes_pay_the_enumerated_kl(family, prior, binary):
    case = Case(family, prior, binary)
    with case.family.exact():
        found = case.monte_carlo()
    truth = truth_and_gradients(case, case.enumerated_kl(), case.prior_parameters())
    assert_agrees(found, truth, "exact")


@pytest.mark.parametrize(("family", "prior", "binary"), RELAXED_CASES)
def test_straight_through_values_pay_the_enumerated_kl(family, prior, binary):
    case = Case(family, prior, binary)
    case.family = case.make_family(family, straight_through=True)
    truth = truth_and_gradients(case, case.enumerated_kl(), case.prior_parameters())
    assert_agrees(case.monte_carlo(), truth, "straight-through")


@pytest.mark.parametrize(("family", "prior", "binary"), SOFT_CASES)
def test_soft_relaxation_pays_the_relaxed_objective_with_its_gradients(family, prior, binary):
    case = Case(family, prior, binary)
    points = 20 if prior == "energy" else 40
    objective = case.relaxed_objective(points)
    truth = truth_and_gradients(case, objective, case.parameters())
    assert_agrees(case.monte_carlo(), truth, "soft")


def test_hard_vq_pays_log_k_per_position_under_a_uniform_prior():
    case = Case("vq", "uniform", binary=False)
    rates = case.rates(8)
    torch.testing.assert_close(rates, torch.full((8,), 3 * np.log(3)))
    assert not rates.requires_grad


@pytest.mark.parametrize("prior", [p for p in PRIORS if p != "uniform"])
def test_hard_vq_pays_the_rate_of_its_codes(prior):
    case = Case("vq", prior, binary=False)
    truth = truth_and_gradients(case, case.vq_rate(), case.parameters())
    assert_agrees(case.monte_carlo(chunks=2, draws=8), truth, "vq")


@pytest.mark.parametrize("family", ["vq", "sq", "bernoulli"])
def test_logits_and_the_same_logits_as_an_opaque_prior_give_the_same_gradients(family):
    binary = family == "bernoulli"
    results = []
    for prior in ("logits", "opaque"):
        case = Case(family, prior, binary)
        pyro.set_rng_seed(1)
        rate = case.rates(256).mean()
        results.append([rate, *torch.autograd.grad(rate, case.parameters(), allow_unused=True)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_the_markov_prior_of_these_tests_is_causal_and_normalised():
    """The ground truth's own check: teacher forcing equals the chain of conditionals."""
    case = Case("sq", "markov", binary=False)
    configs = torch.tensor(list(itertools.product(range(3), repeat=3)))
    total = torch.logsumexp(case.prior_log_probs(configs), 0)
    torch.testing.assert_close(total, torch.tensor(0.0), atol=1e-10, rtol=0)
    codes = case.space.code_of_index(configs)
    teacher = case.site.prior(case.prior_module).expand(torch.Size([27])).log_prob(codes)
    torch.testing.assert_close(teacher, case.prior_log_probs(configs))


@pytest.mark.parametrize("prior", ["markov", "energy"])
def test_rr_refuses_priors_it_cannot_mix_with(prior):
    case = Case("rr", "logits", binary=False)
    case.prior_kind, case.prior_module = prior, Markov(3, 3, 2) if prior == "markov" else RBM(3)
    with pytest.raises(ValueError, match="'rr' family mixes with per-position prior probabilities"):
        case.rates(4)


def test_a_prior_of_another_kind_is_refused():
    site = CodeSite("z", Codebook(3, 2), (3,))
    with pytest.raises(TypeError, match="logits, an AutoregressivePrior or an EnergyPrior"):
        code(site, torch.distributions.Normal(0.0, 1.0))


def test_a_code_guide_against_a_prior_of_no_known_kind_is_refused_by_the_bound():
    book = Codebook(3, 2, init="normal")

    def model():
        pyro.sample("z", pyro.distributions.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide():
        pyro.sample("z", CodeCategorical(torch.zeros(1, 3), book, Concrete(0.5)).to_event(1))

    with pytest.raises(ValueError, match="site 'z': no rate keeps the gradient"):
        elbo_terms(*run_traces(model, guide))
