import math

import pytest
import torch

from probvq.likelihoods import (
    Bernoulli,
    DiscretisedLogistic,
    DiscretisedLogisticDistribution,
    Gaussian,
    bits_per_dim,
    make_likelihood,
)


def test_discretised_logistic_is_a_distribution_over_256_levels():
    levels = torch.arange(256.0) / 127.5 - 1.0
    for loc, log_scale in [(0.0, -2.0), (0.9, -4.0), (-1.2, -1.0), (0.3, -7.0)]:
        d = DiscretisedLogisticDistribution(torch.tensor(loc), torch.tensor(log_scale))
        total = torch.logsumexp(d.log_prob(levels), 0)
        assert total == pytest.approx(0.0, abs=1e-4), (loc, log_scale)


def test_discretised_logistic_mass_matches_the_cdf_difference():
    d = DiscretisedLogisticDistribution(torch.tensor(0.1), torch.tensor(-3.0))
    x = torch.tensor(64.0 / 127.5 - 1.0)
    s = math.exp(-3.0)
    cdf = lambda v: 1 / (1 + math.exp(-(v - 0.1) / s))  # noqa: E731
    expected = math.log(cdf(float(x) + 1 / 255) - cdf(float(x) - 1 / 255))
    assert float(d.log_prob(x)) == pytest.approx(expected, rel=1e-5)


def test_discretised_logistic_stays_finite_far_in_the_tails():
    d = DiscretisedLogisticDistribution(torch.tensor(-1.0), torch.tensor(-7.0))
    assert torch.isfinite(d.log_prob(torch.tensor(0.5)))


def test_logistic_likelihood_reads_two_channels_per_input():
    likelihood = DiscretisedLogistic()
    x = likelihood.prepare(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8))
    assert x.min() >= -1 and x.max() <= 1
    out = torch.zeros(2, 6, 4, 4, requires_grad=True)
    log_p = likelihood(out).log_prob(x)
    assert log_p.shape == (2,)
    log_p.sum().backward()
    assert out.grad.abs().sum() > 0


@pytest.mark.parametrize(("loc", "log_scale"), [(0.1, -1.0), (0.85, -1.5), (-1.1, -0.5)])
def test_samples_follow_the_mass_of_every_level(loc, log_scale):
    # 8 levels, so that each bin's frequency is measured; two of the cases put mass on an edge bin.
    bins, n = 8, 20000
    torch.manual_seed(2)
    d = DiscretisedLogisticDistribution(torch.tensor(loc), torch.tensor(log_scale), bins=bins)
    levels = torch.arange(bins) / (bins - 1) * 2.0 - 1.0
    mass = d.log_prob(levels).exp()
    drawn = d.sample(torch.Size([2, n // 2]))
    assert drawn.shape == (2, n // 2)
    index = ((drawn + 1) / 2 * (bins - 1)).round().long()
    torch.testing.assert_close(drawn, levels[index], rtol=0, atol=1e-6)  # on the grid of levels
    freq = torch.bincount(index.flatten(), minlength=bins) / n
    se = (mass * (1 - mass) / n).sqrt().clamp_min(1e-4)
    assert ((freq - mass).abs() / se).max() < 4.5, (freq, mass)


def test_gaussian_density_and_variance_gradient_are_the_normal_ones():
    likelihood = Gaussian(channels=2, init_log_var=0.7)
    assert torch.equal(likelihood.log_var, torch.full((2, 1, 1), 0.7))
    out = torch.randn(3, 2, 2, 2)
    x = torch.randn(3, 2, 2, 2) * 3
    log_p = likelihood(out).log_prob(x)
    var = torch.tensor([0.7, 0.7]).exp().view(2, 1, 1)
    by_hand = (-0.5 * (x - out) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum((1, 2, 3))
    torch.testing.assert_close(log_p, by_hand)
    log_p.sum().backward()  # d/dv of sum log N(x; out, e^v) = sum (-1/2 + (x - out)^2 / (2 e^v))
    want = (-0.5 + (x - out) ** 2 / (2 * var)).sum((0, 2, 3)).view(2, 1, 1)
    torch.testing.assert_close(likelihood.log_var.grad, want)


@pytest.mark.parametrize(
    ("likelihood", "data", "match"),
    [
        (Bernoulli(), torch.tensor([0.0, 0.5, 1.0]), "binary"),
        (Bernoulli(), torch.tensor([0.0, float("nan")]), "NaN"),
        (Bernoulli(), torch.zeros(0), "empty"),
        (DiscretisedLogistic(), torch.tensor([0.0, 256.0]), "0..255"),
        (DiscretisedLogistic(), torch.tensor([0.5]), "integer"),
        (Gaussian(1), torch.tensor([float("inf")]), "NaN"),
    ],
)
def test_data_of_the_wrong_kind_is_refused(likelihood, data, match):
    with pytest.raises(ValueError, match=match):
        likelihood.check(data, "data")


def test_make_likelihood_by_name_and_kind():
    assert isinstance(make_likelihood("auto", "binary", 1), Bernoulli)
    assert isinstance(make_likelihood("auto", "8bit", 3), DiscretisedLogistic)
    assert isinstance(make_likelihood("gaussian", "8bit", 3), Gaussian)
    with pytest.raises(ValueError, match="likelihood"):
        make_likelihood("poisson", "binary", 1)


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
