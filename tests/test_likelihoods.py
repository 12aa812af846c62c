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


def test_sampling_stays_on_the_grid_of_levels():
    d = DiscretisedLogisticDistribution(torch.zeros(1000), torch.full((1000,), -2.0))
    levels = (d.sample() + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)


def test_gaussian_learns_its_variance():
    likelihood = Gaussian(channels=1)
    x = torch.randn(4, 1, 2, 2) * 3
    (-likelihood(torch.zeros(4, 1, 2, 2)).log_prob(x).sum()).backward()
    assert likelihood.log_var.grad.item() < 0  # data wider than unit variance: grow it


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
