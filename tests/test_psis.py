"""Pareto k-hat: small for a guide equal to the posterior, large for a bad one, signs checked."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from probvq.inference.diagnostics.psis import MIN_SAMPLES, khat_summary, pareto_khat
from probvq.inference.objectives.importance import iwae_bound, log_weights


def gaussian_log_weights(proposal_var: float, points: int = 100, samples: int = 2000) -> torch.Tensor:
    """Target N(0, 1), proposal N(0, v): the weights' tail has shape k = 1 - v for v < 1."""
    z = torch.randn(points, samples, dtype=torch.float64) * math.sqrt(proposal_var)
    return -0.5 * z**2 + 0.5 * z**2 / proposal_var + 0.5 * math.log(proposal_var)


def test_khat_tracks_the_analytic_tail_shape():
    narrow = pareto_khat(gaussian_log_weights(0.1))  # k = 0.9
    assert 0.7 < narrow.median() < 1.1
    assert khat_summary(narrow)["share_above_0.7"] > 0.6
    wide = pareto_khat(gaussian_log_weights(2.0))  # bounded weights, k < 0
    assert wide.max() < 0.5 and khat_summary(wide)["share_above_0.5"] == 0.0


def test_the_sign_convention_is_log_p_minus_log_q():
    """Negated weights (ArviZ's PSIS-LOO convention) would fit the other tail and see no problem."""
    log_w = gaussian_log_weights(0.2)
    assert pareto_khat(log_w).median() > 0.6
    assert pareto_khat(-log_w).median() < 0.3


CODES = torch.arange(12.0)
PRIOR = torch.softmax(-0.3 * (CODES - 4).abs(), 0)


def mixture(x):
    """z ~ Categorical(PRIOR) over 12 codes, x | z ~ N(z, 1): any Pyro program works."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(PRIOR))
        pyro.sample("x", dist.Normal(CODES[z], 1.0), obs=x)


def posterior(x):
    log_joint = PRIOR.log() + dist.Normal(CODES, 1.0).log_prob(x[:, None])
    return torch.softmax(log_joint, -1), torch.logsumexp(log_joint, -1)


def test_a_guide_equal_to_the_posterior_gives_constant_weights_and_the_smallest_khat():
    x = torch.linspace(-1, 12, 40)

    def exact_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(posterior(x)[0]))

    log_w = torch.cat(list(log_weights(mixture, exact_guide, x, 500, 100_000)))
    assert torch.allclose(iwae_bound(log_w), posterior(x)[1].double(), atol=1e-4)
    khat = pareto_khat(log_w)
    assert torch.isneginf(khat).all()
    summary = khat_summary(khat)
    assert summary["bounded"] == 40 and summary["share_above_0.5"] == 0.0


def test_a_guide_with_too_light_a_tail_gives_a_large_khat():
    """q(z) ∝ 0.95^z against p(z) ∝ 0.998^z on 600 codes: weights grow like (0.998/0.95)^z."""
    codes = torch.arange(600.0)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=codes * math.log(0.998)))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def bad_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=codes * math.log(0.95)))

    log_w = torch.cat(list(log_weights(model, bad_guide, torch.zeros(30), 2000, 100_000)))
    khat = pareto_khat(log_w)  # the tail's shape is log(0.998 / 0.95) / -log(0.95) = 0.96
    assert khat.median() > 0.75
    assert khat_summary(khat)["share_above_0.7"] > 0.6


def test_ties_at_the_top_are_bounded_but_ties_below_a_spread_tail_are_not():
    tied = torch.tensor([0.0, -1.0, -2.0])[torch.multinomial(torch.tensor([0.3, 0.5, 0.2]), 1000, True)]
    assert torch.isneginf(pareto_khat(tied[None]))
    spread = torch.randn(1000, dtype=torch.float64)
    spread[:500] = spread.min()
    assert torch.isfinite(pareto_khat(spread[None])).all()


@pytest.mark.parametrize("outliers", [1, 4])
def test_a_few_distinct_draws_above_a_tie_are_not_called_bounded(outliers):
    """They carry nearly all the weight: the opposite of a bounded tail."""
    log_w = torch.zeros(1000, dtype=torch.float64)
    log_w[:outliers] = torch.linspace(6.0, 10.0, outliers)
    assert pareto_khat(log_w[None]).item() == math.inf


def test_too_few_samples_have_no_khat():
    khat = pareto_khat(torch.randn(3, MIN_SAMPLES - 1))
    assert torch.isnan(khat).all()
    assert khat_summary(khat)["undefined"] == 3
    assert torch.isfinite(pareto_khat(torch.randn(3, MIN_SAMPLES))).all()


def test_bad_log_weights_are_refused():
    with pytest.raises(ValueError, match="log_weights: expected a"):
        pareto_khat(torch.zeros(5))
    bad = torch.zeros(2, 100)
    bad[1, 3] = -math.inf
    with pytest.raises(ValueError, match="finite"):
        pareto_khat(bad)
