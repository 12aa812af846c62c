"""Importance-weighted bounds against exact log p(x) on a model small enough to enumerate."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pyro import poutine

from probvq.inference import RR, SQ, VQ
from probvq.inference.objectives.importance import curve_sizes, iwae_bound, log_weights

ROWS = 50_000


def draws(tiny, family, x, k, rows=ROWS):
    """The (points, k) log-weights of exact codes under ``family``."""
    model, guide = family.wrap(tiny.model), family.wrap(tiny.guide)
    with torch.no_grad(), family.exact():
        return torch.cat(list(log_weights(model, guide, x, k, rows)))


def exact_log_q(tiny, family, x):
    """``log q(c | x)`` of every configuration c, shape (C, B), from the guide's own site."""
    with torch.no_grad(), family.exact():
        site = poutine.trace(family.wrap(tiny.guide)).get_trace(x).nodes["z"]
        rows = [
            site["fn"].log_prob(tiny.codebook.code_of_index(c).expand(x.shape[0], -1, -1))
            for c in tiny.configurations()
        ]
    return torch.stack(rows).double()


def expected_iwae(log_w, log_q, k):
    """``E[IWAE_k]`` exactly, summing over all ``C^k`` draws: shape (B,)."""
    total = torch.zeros(log_w.shape[1], dtype=torch.float64)
    for draw in itertools.product(range(log_w.shape[0]), repeat=k):
        index = torch.tensor(draw)
        weight = log_q[index].sum(0).exp()
        total += weight * (torch.logsumexp(log_w[index], 0) - math.log(k))
    return total


@pytest.fixture
def rr(tiny):
    return RR(tiny.code_sites, init_var=1.0)


def test_iwae_converges_to_the_exact_log_marginal(tiny, tiny_data, rr):
    """Mean |IWAE_k - log p(x)| over 20 replicate runs of each point falls with k (0.026 at 5,000)."""
    log_p = tiny.log_marginal(tiny_data).detach().double()[:, None]
    log_w = draws(tiny, rr, tiny_data.repeat_interleave(20, 0), 5000).view(5, 20, 5000)
    errors = {k: (iwae_bound(log_w[..., :k]) - log_p).abs().mean() for k in (1, 10, 100, 5000)}
    assert errors[5000] < 0.05
    assert errors[5000] < errors[100] < errors[10] < errors[1]


def test_bound_ordering_in_expectation_against_exact_enumeration(tiny, tiny_data, rr):
    """ELBO = E[IWAE_1] <= E[IWAE_2] <= E[IWAE_3] <= log p(x), exactly, and Monte Carlo agrees."""
    x = tiny_data[:3]
    log_joint = tiny.log_joint(x).detach().double()  # (C, B)
    log_q = exact_log_q(tiny, rr, x)
    log_w = log_joint - log_q
    truth = {k: expected_iwae(log_w, log_q, k) for k in (1, 2, 3)}
    assert torch.allclose(truth[1], (log_q.exp() * log_w).sum(0))  # E[IWAE_1] is the ELBO
    assert (truth[1] < truth[2]).all() and (truth[2] < truth[3]).all()
    assert (truth[3] < tiny.log_marginal(x).double()).all()

    replicates = 4000
    sampled = draws(tiny, rr, x.repeat_interleave(replicates, 0), 3).view(3, replicates, 3)
    for k in (1, 2, 3):
        estimates = iwae_bound(sampled[..., :k])  # (B, replicates)
        se = estimates.std(1) / math.sqrt(replicates)
        assert ((estimates.mean(1) - truth[k]).abs() < 4 * se).all(), k


def test_larger_k_is_tighter_by_more_than_the_noise(tiny, tiny_data, rr):
    replicates = 1000
    x = tiny_data.repeat_interleave(replicates, 0)
    sampled = draws(tiny, rr, x, 100).view(5, replicates, 100)
    for small, large in ((1, 10), (10, 100)):
        gain = (iwae_bound(sampled[..., :large]) - iwae_bound(sampled[..., :small])).flatten()
        assert gain.mean() > 5 * gain.std() / math.sqrt(gain.numel()), (small, large)


def test_a_point_mass_guide_never_tightens(tiny, tiny_data):
    """Hard VQ: q is a point mass, every weight is p(x, z*), so IWAE_k is the ELBO for all k."""
    log_w = draws(tiny, VQ(tiny.code_sites), tiny_data, 50)
    assert torch.allclose(log_w, log_w[:, :1].expand_as(log_w))
    assert torch.allclose(iwae_bound(log_w), log_w[:, 0].double())


def test_sq_weights_leave_out_the_dequantisation_draw(tiny, tiny_data):
    """SQ's z~ is read by no site, so the weights are p(x, z) / q(z): exact with enough draws."""
    sq = SQ(tiny.code_sites, init_var=4.0)
    log_w = draws(tiny, sq, tiny_data, 4000)
    log_q = exact_log_q(tiny, sq, tiny_data)
    log_joint = tiny.log_joint(tiny_data).detach().double()
    code_only_elbo = (log_q.exp() * (log_joint - log_q)).sum(0)
    se = log_w.std(1) / math.sqrt(log_w.shape[1])
    assert ((log_w.mean(1) - code_only_elbo).abs() < 4 * se).all()
    assert (iwae_bound(log_w) - tiny.log_marginal(tiny_data)).abs().max() < 0.05


def test_passes_never_exceed_the_rows_asked_for(tiny, tiny_data, rr):
    seen = []

    def guide(x):
        seen.append(x.shape[0])
        return tiny.guide(x)

    model, wrapped = rr.wrap(tiny.model), rr.wrap(guide)
    with torch.no_grad(), rr.exact():
        for rows in (7, 30, 1000):
            seen.clear()
            groups = list(log_weights(model, wrapped, tiny_data, 12, rows))
            assert torch.cat(groups).shape == (5, 12)
            assert max(seen) <= rows and sum(seen) == 5 * 12


def test_bad_arguments_are_refused(tiny, tiny_data, rr):
    with pytest.raises(ValueError, match="k: expected"):
        next(log_weights(tiny.model, tiny.guide, tiny_data, 0, 10))
    with pytest.raises(ValueError, match="rows: expected"):
        next(log_weights(tiny.model, tiny.guide, tiny_data, 5, 0))


def test_curve_sizes():
    assert curve_sizes(1) == [1]
    assert curve_sizes(1000) == [1, 10, 100, 1000]
    assert curve_sizes(5000) == [1, 10, 100, 1000, 5000]


def test_a_model_latent_the_guide_never_samples_is_refused(tiny, tiny_data, rr):
    with pytest.raises(
        ValueError, match="site 'z': a latent of the model that the guide does not sample"
    ):
        next(log_weights(rr.wrap(tiny.model), lambda x: None, tiny_data, 3, 100))
