"""Code groups (residual quantisation): every parameter's gradient through probvq equals the gradient
of the same step written by hand in plain PyTorch (same weights, batch and codes), for 1, 2 and 4
depths under each codebook family: RQ-VAE under ``vq``, RSQ-VAE under ``sq``, per-depth
responsibilities under ``rr``."""

import copy

import pyro
import pytest
import torch
from torch import nn

from probvq import DATA_PLATE, Codebook, CodeGroup, CodeSite, code
from probvq.inference import RR, SQ, VQ

N, D, K, X = 3, 2, 5, 6
TAU = 0.7


class Residual(nn.Module):
    """x in {0,1}^6; N positions, each the sum of ``depth`` codes (one codebook per depth, or one
    shared)."""

    def __init__(self, depth: int, shared: bool = False):
        super().__init__()
        books = [Codebook(K, D, init="normal")] * depth if shared else None
        books = books or [Codebook(K, D, init="normal") for _ in range(depth)]
        self.group = CodeGroup("z", [CodeSite(f"z{i}", books[i], (N,)) for i in range(depth)])
        self.prior_logits = nn.Parameter(torch.randn(depth, N, K))
        self.encoder = nn.Linear(X, N * D)
        self.decoder = nn.Linear(N * D, X)

    @property
    def code_sites(self):
        return list(self.group.sites)

    def priors(self, batch):
        return [logits.expand(batch, N, K) for logits in self.prior_logits]

    def model(self, x):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z = code(self.group, self.priors(x.shape[0]))
            logits = self.decoder(z.flatten(-2))
            pyro.sample("x", pyro.distributions.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            zhat = self.encoder(x).view(-1, N, D)
            code(self.group, self.priors(x.shape[0]), features=zhat)


def categorical_kl(q_logits, p_logits):
    log_q, log_p = q_logits.log_softmax(-1), p_logits.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def squared_distances(r, book):
    return (r.unsqueeze(-2) - book).pow(2).sum(-1)


def nll(vae, decoder_input, x):
    logits = vae.decoder(decoder_input.flatten(-2))
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")


def by_hand_vq(vae, x, beta=0.25):
    """RQ-VAE: straight-through on the sum, commitment per depth, codebook loss per depth."""
    zhat = vae.encoder(x).view(-1, N, D)
    residual, partial, loss = zhat, torch.zeros_like(zhat), 0.0
    for depth, site in enumerate(vae.group.sites):
        book = site.space.weight
        index = squared_distances(residual.detach(), book.detach()).argmin(-1)
        e = book[index]
        log_prior = vae.prior_logits[depth].log_softmax(-1).expand(x.shape[0], N, K)
        loss = loss - log_prior.gather(-1, index.unsqueeze(-1)).sum()
        loss = loss + (residual.detach() - e).pow(2).sum()
        partial = partial + e.detach()
        loss = loss + beta * (zhat - partial).pow(2).sum()
        residual = residual - e.detach()
    decoder_input = zhat + (partial - zhat).detach()
    return loss + nll(vae, decoder_input, x)


def relaxed_draw(logits, noise):
    return torch.softmax((logits + noise) / TAU, -1)


def by_hand_sq(vae, x, family, noise):
    """RSQ-VAE: residuals of the relaxed values, one dequantisation term on the sum."""
    zhat = vae.encoder(x).view(-1, N, D)
    residual, total, loss = zhat, 0.0, 0.0
    for depth, site in enumerate(vae.group.sites):
        book, var = site.space.weight, family.log_var[site.name].exp()
        logits = -squared_distances(residual, book) / (2 * var)
        value = relaxed_draw(logits, noise[depth]) @ book
        loss = loss + categorical_kl(logits, vae.prior_logits[depth]).sum()
        total = total + value
        residual = residual - value
    loss = loss + (zhat - total).pow(2).sum() / (2 * var)  # var: the last depth's
    return loss + nll(vae, total, x)


def by_hand_rr(vae, x, family, noise):
    """Per-depth responsibilities mixing with each depth's prior."""
    zhat = vae.encoder(x).view(-1, N, D)
    residual, total, loss = zhat, 0.0, 0.0
    for depth, site in enumerate(vae.group.sites):
        book, log_var = site.space.weight, family.log_var[site.name]
        prior = vae.prior_logits[depth]
        logits = (
            prior.log_softmax(-1)
            - 0.5 * D * log_var
            - squared_distances(residual, book) / (2 * log_var.exp())
        )
        value = relaxed_draw(logits, noise[depth]) @ book
        loss = loss + categorical_kl(logits, prior).sum()
        total = total + value
        residual = residual - value
    return loss + nll(vae, total, x)


class RecordedNoise:
    """Gumbel noise drawn by probvq, recorded so the hand-written step can reuse it."""

    def __init__(self):
        self.draws = []

    def __call__(self, logits):
        noise = -torch.empty_like(logits).exponential_().log()
        self.draws.append(noise)
        return noise


def gradients(vae, family, loss):
    modules = [vae] + ([family] if family is not None else [])
    params = [p for m in modules for p in m.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    names = [n for m in modules for n, _ in m.named_parameters()]
    return dict(zip(names, grads, strict=True))


@pytest.fixture
def float64():
    """Double precision, so that "equal" means equal up to rounding of the distance identity."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


RELAXED = {"temperature": TAU, "temperature_min": TAU, "init_var": 0.7, "straight_through": False}
FAMILIES = {
    "vq": lambda sites: VQ(sites),
    "sq": lambda sites: SQ(sites, **RELAXED),
    "rr": lambda sites: RR(sites, **RELAXED),
}


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_gradient_matches_the_step_written_by_hand(name, depth, shared, monkeypatch, float64):
    torch.manual_seed(depth)
    vae = Residual(depth, shared)
    with torch.no_grad():  # spread the log-variances so that per-code and per-depth terms differ
        for p in vae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    family = FAMILIES[name](vae.code_sites)
    with torch.no_grad():
        for p in family.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.bernoulli(torch.full((7, X), 0.4))
    noise = RecordedNoise()
    monkeypatch.setattr("probvq.codes.gumbel_like", noise)
    loss = family.elbo().differentiable_loss(family.wrap(vae.model), family.wrap(vae.guide), x)
    ours = gradients(vae, family, loss)

    theirs_vae, theirs_family = copy.deepcopy(vae), copy.deepcopy(family)
    if name == "vq":
        expected = by_hand_vq(theirs_vae, x)
    else:
        by_hand = by_hand_sq if name == "sq" else by_hand_rr
        expected = by_hand(theirs_vae, x, theirs_family, noise.draws)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    theirs = gradients(theirs_vae, theirs_family, expected)
    assert set(ours) == set(theirs)
    for param, grad in theirs.items():
        assert grad is not None and ours[param] is not None, param
        torch.testing.assert_close(
            ours[param], grad, rtol=1e-9, atol=1e-9, msg=lambda m, p=param: f"{p}: {m}"
        )


def test_the_decoder_reads_the_sum_and_later_depths_quantise_the_residual():
    torch.manual_seed(0)
    vae = Residual(2)
    family = VQ(vae.code_sites)
    x = torch.bernoulli(torch.full((4, X), 0.5))
    with family.exact(), torch.no_grad():
        guide_trace = pyro.poutine.trace(family.wrap(vae.guide)).get_trace(x)
    zhat = vae.encoder(x).view(-1, N, D).detach()
    first, second = (vae.group.sites[i].space for i in (0, 1))
    index0 = first.index_of(guide_trace.nodes["z0"]["value"])
    index1 = second.index_of(guide_trace.nodes["z1"]["value"])
    assert torch.equal(index0, first.nearest(zhat))
    assert torch.equal(index1, second.nearest(zhat - first.weight[index0]))


def test_a_family_answers_a_group_whole():
    vae = Residual(2)
    half = VQ(vae.code_sites, claims=["z0"])
    with pytest.raises(ValueError, match="claims only some"):
        half.wrap(vae.guide)(torch.zeros(2, X))


def test_group_declarations_are_checked():
    with pytest.raises(ValueError, match="distinct names"):
        CodeGroup("z", [CodeSite("a", Codebook(3, 2), (2,)), CodeSite("a", Codebook(3, 2), (2,))])
    with pytest.raises(ValueError, match="residual depths share"):
        CodeGroup("z", [CodeSite("a", Codebook(3, 2), (2,)), CodeSite("b", Codebook(3, 3), (2,))])
    group = CodeGroup("z", [CodeSite("a", Codebook(3, 2), (2,)), CodeSite("b", Codebook(3, 2), (2,))])
    with pytest.raises(ValueError, match="2 priors"):
        code(group, torch.zeros(1, 2, 3))
