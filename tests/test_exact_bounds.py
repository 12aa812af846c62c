"""On a model small enough to enumerate (2 positions x 3 codes = 9 configurations), every family's
exact ELBO is checked against log p(x) computed by brute force."""

import pytest
import torch
from conftest import CODEBOOK_FAMILIES
from torch.distributions import Independent

from probvq.codes import CodePoint
from probvq.inference import FAMILIES, elbo_terms, run_traces

FAMILY_NAMES = CODEBOOK_FAMILIES


def guide_code_log_probs(vae, family, x):
    """log q(z_n = k | x) per position, shape (B, N, K), and the exact guide trace."""
    with family.exact(), torch.no_grad():
        _, guide_trace = run_traces(family.wrap(vae.model), family.wrap(vae.guide), x)
    fn = guide_trace.nodes["z"]["fn"]
    while isinstance(fn, Independent):
        fn = fn.base_dist
    if isinstance(fn, CodePoint):
        one_hot = torch.nn.functional.one_hot(fn.index, vae.codebook.num_codes).bool()
        return torch.zeros(one_hot.shape).masked_fill(~one_hot, -torch.inf), guide_trace
    return fn.log_probs, guide_trace


def expected_elbo(vae, family, x):
    """E_q[ELBO] by enumerating q, and log p(x) - KL(q || p(z | x)) for comparison."""
    log_q_pos, guide_trace = guide_code_log_probs(vae, family, x)
    configs = vae.configurations()  # (C, N)
    positions = torch.arange(configs.shape[1])
    log_q = log_q_pos[:, positions, configs].sum(-1).T  # (C, B)
    with torch.no_grad():
        log_joint = vae.log_joint(x)  # (C, B)
    q = log_q.exp()
    safe_log_q = torch.where(q > 0, log_q, torch.zeros_like(log_q))
    elbo = (q * (log_joint - safe_log_q)).sum(0)
    if "z.deq" in guide_trace.nodes:  # SQ: E_q ||zhat - e_z||^2 / (2 s^2)
        zhat = guide_trace.nodes["z.deq"]["fn"].base_dist.loc  # (B, N, D)
        var = torch.exp(family.log_var["z"]).detach()
        codes = vae.codebook.weight.detach()[configs]  # (C, N, D)
        deq = (zhat[None] - codes[:, None]).pow(2).sum((-1, -2)) / (2 * var)  # (C, B)
        elbo = elbo - (q * deq).sum(0)
    log_px = torch.logsumexp(log_joint, 0)
    log_post = log_joint - log_px
    kl_post = (q * (safe_log_q - log_post)).sum(0)
    return elbo, log_px, kl_post


def perturb(vae):
    """Move away from the initial parameters so the check is not a special case."""
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.5 * torch.randn_like(p))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_exact_elbo_is_below_log_marginal(tiny, tiny_data, name):
    for trial in range(3):
        family = FAMILIES[name].cls(tiny.code_sites)
        elbo, log_px, kl_post = expected_elbo(tiny, family, tiny_data)
        assert torch.all(elbo <= log_px + 1e-5), (trial, elbo, log_px)
        assert torch.all(kl_post >= -1e-5)
        perturb(tiny)


@pytest.mark.parametrize("name", ["vq", "rr"])
def test_elbo_equals_log_marginal_minus_kl_to_the_posterior(tiny, tiny_data, name):
    family = FAMILIES[name].cls(tiny.code_sites)
    elbo, log_px, kl_post = expected_elbo(tiny, family, tiny_data)
    torch.testing.assert_close(elbo, log_px - kl_post, rtol=0, atol=1e-4)


def test_sq_pays_the_dequantisation_term_on_top(tiny, tiny_data):
    family = FAMILIES["sq"].cls(tiny.code_sites, init_var=0.5)
    elbo, log_px, kl_post = expected_elbo(tiny, family, tiny_data)
    assert torch.all(elbo < log_px - kl_post)


def test_rr_is_tight_when_its_posterior_is_exact(tiny, tiny_data):
    """Decoder ignores z, so p(z | x) = p(z); codes equidistant from zhat = 0 give q = prior."""
    with torch.no_grad():
        tiny.decoder[0].weight.zero_()
        tiny.codebook.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        tiny.encoder.weight.zero_()
        tiny.encoder.bias.zero_()
    family = FAMILIES["rr"].cls(tiny.code_sites)
    elbo, log_px, kl_post = expected_elbo(tiny, family, tiny_data)
    torch.testing.assert_close(kl_post, torch.zeros_like(kl_post), rtol=0, atol=1e-5)
    torch.testing.assert_close(elbo, log_px, rtol=0, atol=1e-5)


def test_vq_is_tight_when_the_posterior_is_its_point_mass(tiny, tiny_data):
    """A prior concentrated on code 0, which is also every position's nearest code."""
    with torch.no_grad():
        tiny.prior_logits.copy_(torch.tensor([40.0, 0.0, 0.0]).expand(2, 3))
        tiny.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]]))
        tiny.encoder.weight.zero_()
        tiny.encoder.bias.zero_()
    family = FAMILIES["vq"].cls(tiny.code_sites)
    elbo, log_px, _ = expected_elbo(tiny, family, tiny_data)
    torch.testing.assert_close(elbo, log_px, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_sampled_exact_elbo_is_unbiased(tiny, name):
    perturb(tiny)
    family = FAMILIES[name].cls(tiny.code_sites)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    expected, _, _ = expected_elbo(tiny, family, x)
    draws = x.expand(20_000, -1)
    with family.exact(), torch.no_grad():
        sampled = elbo_terms(*run_traces(family.wrap(tiny.model), family.wrap(tiny.guide), draws))
    values = sampled.elbo
    se = values.std() / values.numel() ** 0.5
    assert abs(float(values.mean() - expected[0])) < 5 * float(se) + 1e-4
