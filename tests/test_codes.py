import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from probvq import BinaryUnits, Codebook, CodeCategorical, CodePoint, Concrete, StraightThrough
from probvq.codes import normalised_logits
from probvq.inference import CodeELBO


def monte_carlo_kl(q, p, draws=20_000):
    values = q.sample((draws,))
    log_ratio = q.log_prob(values) - p.log_prob(values)
    return log_ratio.mean(0), log_ratio.std(0) / draws**0.5


@pytest.mark.parametrize("space", [Codebook(6, 3, init="normal"), BinaryUnits()])
def test_analytic_kl_matches_monte_carlo(space):
    k = space.num_codes
    q = CodeCategorical(torch.randn(4, k) * 2, space)
    p = CodeCategorical(torch.randn(4, k), space)
    analytic = kl_divergence(q, p)
    estimate, se = monte_carlo_kl(q, p)
    assert analytic.shape == (4,)
    assert torch.all((analytic - estimate).abs() < 5 * se + 1e-3)
    assert torch.all(analytic >= 0)


def test_kl_of_a_point_mass_is_the_prior_surprise():
    book = Codebook(5, 2, init="normal")
    p = CodeCategorical(torch.randn(3, 5), book)
    index = torch.tensor([0, 4, 2])
    q = CodePoint(index, book)
    expected = -torch.log_softmax(p.logits, -1).gather(-1, index[:, None]).squeeze(-1)
    torch.testing.assert_close(kl_divergence(q, p), expected)
    estimate, _ = monte_carlo_kl(q, p, draws=10)
    torch.testing.assert_close(estimate, expected)


def test_kl_is_registered_through_independent_wrappers():
    book = Codebook(4, 2, init="normal")
    q = CodeCategorical(torch.randn(2, 3, 4), book).to_event(1)
    p = CodeCategorical(torch.zeros(2, 3, 4), book).to_event(1)
    kl = kl_divergence(q, p)
    assert kl.shape == (2,)
    torch.testing.assert_close(kl, kl_divergence(q.base_dist, p.base_dist).sum(-1))


def test_log_prob_is_the_exact_categorical_probability_of_the_code():
    book = Codebook(4, 3, init="normal")
    logits = torch.randn(2, 4)
    q = CodeCategorical(logits, book)
    code = book.code_of_index(torch.tensor([1, 3]))  # not drawn by q
    expected = torch.log_softmax(logits, -1)[[0, 1], [1, 3]]
    torch.testing.assert_close(q.log_prob(code), expected)
    codes = [book.code_of_index(torch.tensor([j, j])) for j in range(4)]
    total = torch.logsumexp(torch.stack([q.log_prob(c) for c in codes]), 0)
    torch.testing.assert_close(total, torch.zeros(2), atol=1e-6, rtol=0)


def test_a_code_names_its_index_whatever_its_value():
    """Two identical codebook rows: the index channel still tells the codes apart."""
    book = Codebook(3, 2, init="normal")
    with torch.no_grad():
        book.weight[2] = book.weight[0]
    q = CodeCategorical(torch.tensor([0.0, 1.0, 2.0]), book)
    log_p = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    for j in (0, 2):
        torch.testing.assert_close(q.log_prob(book.code_of_index(torch.tensor(j))), log_p[j])


def test_straight_through_passes_the_gradient_to_the_anchor_unchanged():
    book = Codebook(8, 3, init="normal")
    anchor = torch.randn(5, 3, requires_grad=True)
    index = book.nearest(anchor)
    code = CodePoint(index, book, anchor).rsample()
    assert torch.equal(book.index_of(code), index)
    value = book.value_of(code)
    torch.testing.assert_close(value, book.weight[index].detach())
    upstream = torch.randn(5, 3)
    (value * upstream).sum().backward()
    torch.testing.assert_close(anchor.grad, upstream)
    assert book.weight.grad is None


def test_straight_through_rule_on_a_categorical():
    book = Codebook(8, 3, init="normal")
    anchor = torch.randn(5, 3, requires_grad=True)
    code = CodeCategorical(torch.randn(5, 8), book, StraightThrough(anchor)).rsample()
    index, value = book.index_of(code), book.value_of(code)
    torch.testing.assert_close(value, book.weight[index].detach())
    value.sum().backward()
    torch.testing.assert_close(anchor.grad, torch.ones(5, 3))


@pytest.mark.parametrize("hard", [False, True])
def test_concrete_samples_carry_gradient_to_logits_and_codebook(hard):
    book = Codebook(6, 2, init="normal")
    logits = torch.randn(10, 6, requires_grad=True)
    q = CodeCategorical(logits, book, Concrete(0.5, hard=hard))
    code = q.rsample()
    value = book.value_of(code)
    if hard:
        torch.testing.assert_close(value, book.weight[book.index_of(code)].detach())
    value.pow(2).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert book.weight.grad is not None and book.weight.grad.abs().sum() > 0


def test_the_code_behind_a_relaxed_sample_is_an_exact_draw():
    book = Codebook(4, 2, init="normal")
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = CodeCategorical(probs.log().expand(40_000, 4), book, Concrete(2.0))
    code = q.rsample()
    index = book.index_of(code)
    counts = torch.bincount(index, minlength=4).float() / 40_000
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)
    # the soft value is not a codebook row, yet log_prob scores its exact code, also for a copy
    assert (book.value_of(code) - book.weight[index]).abs().max() > 0.01
    torch.testing.assert_close(q.log_prob(code), probs.log()[index])
    torch.testing.assert_close(q.log_prob(code.detach().clone()), probs.log()[index])
    torch.testing.assert_close(q.log_prob(code.double().float()), probs.log()[index])


def test_exact_samples_have_no_rsample_and_unanchored_points_no_gradient():
    book = Codebook(3, 2, init="normal")
    assert not CodeCategorical(torch.zeros(3), book).has_rsample
    with pytest.raises(NotImplementedError):
        CodeCategorical(torch.zeros(3), book).rsample()
    assert not CodePoint(torch.tensor(1), book).rsample().requires_grad


def test_point_mass_scores_other_codes_minus_infinity():
    book = Codebook(3, 2, init="normal")
    q = CodePoint(torch.tensor([0, 2]), book)
    scores = q.log_prob(book.code_of_index(torch.tensor([0, 1])))
    assert scores[0] == 0 and scores[1] == -torch.inf


def test_normalised_logits_keeps_broadcast_priors_as_views():
    base = torch.randn(7)
    expanded = base.expand(100, 49, 7)
    out = normalised_logits(expanded)
    assert out.stride()[:2] == (0, 0)
    torch.testing.assert_close(out[3, 5], torch.log_softmax(base, -1))


def test_relaxed_values_pass_pyro_validation_at_a_model_site():
    """A soft sample replayed into a categorical prior site is valid and scored exactly."""
    assert pyro.infer.util.is_validation_enabled()
    book = Codebook(5, 3, init="normal")

    def model():
        with pyro.plate("data", 4):
            z = pyro.sample("z", CodeCategorical(torch.zeros(4, 2, 5), book).to_event(1))
            pyro.sample(
                "x", dist.Normal(book.value_of(z).sum(-1), 1.0).to_event(1), obs=torch.zeros(4, 2)
            )

    logits = torch.randn(4, 2, 5, requires_grad=True)

    def guide():
        with pyro.plate("data", 4):
            q = CodeCategorical(logits, book, Concrete(0.7))
            pyro.sample("z", q.to_event(1))

    for elbo in (Trace_ELBO(), TraceMeanField_ELBO(), CodeELBO()):
        loss = elbo.differentiable_loss(model, guide)
        assert torch.isfinite(loss)
        loss.backward()
    assert logits.grad.abs().sum() > 0


def test_logits_must_match_the_number_of_codes():
    with pytest.raises(ValueError, match="K=4"):
        CodeCategorical(torch.zeros(2, 3), Codebook(4, 2))


def test_nan_logits_are_refused_under_validation():
    with pytest.raises(ValueError, match="NaN"):
        CodeCategorical(torch.tensor([0.0, float("nan")]).expand(5, 2), BinaryUnits())
    assert (
        CodeCategorical(torch.tensor([0.0, -torch.inf]), BinaryUnits()).log_prob(torch.tensor(0.0)) == 0
    )


def test_codes_ruled_out_by_both_sides_give_finite_kl_entropy_and_gradients():
    book = Codebook(3, 2, init="normal")
    q_logits = torch.tensor([0.0, 0.0, -torch.inf], requires_grad=True)
    q = CodeCategorical(q_logits, book)
    p = CodeCategorical(torch.tensor([0.0, 1.0, -torch.inf]), book)
    kl, entropy = kl_divergence(q, p), q.entropy()
    assert torch.isfinite(kl) and torch.isfinite(entropy)
    expected = 0.5 * (torch.log(torch.tensor(0.5)) - torch.log_softmax(p.logits, -1)[:2]).sum()
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(entropy, torch.log(torch.tensor(2.0)))
    (kl + entropy).backward()
    assert torch.all(torch.isfinite(q_logits.grad))


def test_concrete_refuses_a_non_positive_temperature():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            Concrete(bad)
