"""RBM machinery (free energy, Gibbs, exact and annealed log Z, PCD) and the RBM-prior hybrid,
checked against enumeration of every state of small RBMs."""

import json
import os
import signal

import pytest
import torch
from test_resume import assert_bitwise_equal
from torch import nn

from probvq.cli import main
from probvq.inference import RelaxedBernoulli, diagnose, evaluate, load_checkpoint
from probvq.inference.training import train
from probvq.likelihoods import make_likelihood
from probvq.models import RBMVAE
from probvq.rbm import RBM, RBMPrior, ais, binary_states, temperatures


def random_rbm(units, hidden, scale=1.0, seed=0):
    torch.manual_seed(seed)
    rbm = RBM(units, hidden, init_scale=scale)
    with torch.no_grad():
        rbm.visible_bias.normal_(0, 1)
        rbm.hidden_bias.normal_(0, 1)
    return rbm


def exact_probs(rbm):
    """p(h) over all 2^D states and log Z, by brute force over the joint (h, u) when it is small."""
    h = binary_states(rbm.units).double()
    weight, b, c = rbm.parameters64()
    if rbm.units + rbm.hidden > 16:  # sum u out analytically (the free energy's own formula)
        log_p = h @ b + torch.nn.functional.softplus(c + h @ weight).sum(-1)
        return log_p.softmax(0), torch.logsumexp(log_p, 0)
    u = binary_states(rbm.hidden).double()
    log_joint = (h @ b)[:, None] + (u @ c)[None, :] + h @ weight @ u.T
    return torch.logsumexp(log_joint, 1).softmax(0), torch.logsumexp(log_joint.flatten(), 0)


def exact_samples(rbm, n):
    probs, _ = exact_probs(rbm)
    return binary_states(rbm.units)[torch.multinomial(probs.float(), n, replacement=True)]


def test_free_energy_sums_out_the_hidden_units():
    rbm = random_rbm(5, 4)
    h, u = binary_states(5), binary_states(4)
    energies = rbm.energy(h[:, None, :], u[None, :, :])  # (32, 16)
    torch.testing.assert_close(rbm.free_energy(h), -torch.logsumexp(-energies, 1))
    torch.testing.assert_close(rbm.hidden_free_energy(u), -torch.logsumexp(-energies, 0))


@pytest.mark.parametrize(("units", "hidden"), [(9, 4), (4, 9), (7, 7)])
def test_exact_log_z_enumerates_either_side_like_the_joint(units, hidden):
    rbm = random_rbm(units, hidden)
    _, expected = exact_probs(rbm)
    assert rbm.log_z_exact().dtype == torch.float64
    torch.testing.assert_close(rbm.log_z_exact(), expected)
    torch.testing.assert_close(rbm.log_z_exact(chunk=16), expected)


def test_exact_log_z_refuses_more_than_twenty_units_on_the_smaller_side():
    with pytest.raises(ValueError, match=r"21 units, 2\^21 states"):
        RBM(30, 21).log_z_exact()


def test_gibbs_chains_reach_the_exact_distribution_of_a_tiny_rbm():
    rbm = random_rbm(3, 2, scale=2.0)
    probs, _ = exact_probs(rbm)
    torch.manual_seed(1)
    chains = rbm.gibbs(torch.zeros(40_000, 3), sweeps=100)
    index = (chains * torch.tensor([4.0, 2.0, 1.0])).sum(1).long()
    found = torch.bincount(index, minlength=8).double() / chains.shape[0]
    se = (probs * (1 - probs) / chains.shape[0]).sqrt()
    assert ((found - probs).abs() < 4 * se + 1e-4).all(), (found, probs)
    assert probs.max() > 2 * probs.min()  # a distribution far from uniform, or the test proves little


@pytest.mark.parametrize(("units", "hidden", "scale"), [(16, 12, 0.5), (12, 16, 1.0), (20, 10, 0.3)])
def test_ais_agrees_with_exact_log_z_forward_and_reverse(units, hidden, scale):
    """Tolerance: 0.1 nats with 200 chains and 2,000 temperatures; each estimate's +-3 se
    interval holds the exact value. Reverse runs start from exact samples."""
    rbm = random_rbm(units, hidden, scale)
    exact = float(rbm.log_z_exact())
    generator = torch.Generator().manual_seed(0)
    forward = ais(rbm, 200, 2000, generator=generator)
    torch.manual_seed(0)
    reverse = ais(rbm, steps=2000, reverse_from=exact_samples(rbm, 200), generator=generator)
    for estimate in (forward, reverse):
        assert abs(estimate.log_z - exact) < 0.1, (estimate.report(), exact)
        low, high = estimate.interval()
        assert low <= exact <= high
        assert estimate.log_weights.dtype == torch.float64


@pytest.mark.parametrize(("units", "hidden"), [(4, 6), (5, 3), (4, 4)])
def test_exact_samples_follow_the_enumerated_distribution(units, hidden):
    """Either side enumerated (the smaller; ``u`` on a tie), against ``p(h)`` by brute force."""
    rbm = random_rbm(units, hidden, scale=1.5)
    probs, _ = exact_probs(rbm)
    draws = rbm.sample_exact(40_000, torch.Generator().manual_seed(0))
    index = (draws * 2 ** torch.arange(units - 1, -1, -1)).sum(1).long()
    found = torch.bincount(index, minlength=2**units).double() / draws.shape[0]
    se = (probs * (1 - probs) / draws.shape[0]).sqrt()
    assert ((found - probs).abs() < 4 * se + 1e-4).all(), (found, probs)
    with pytest.raises(ValueError, match=r"sample_exact: the smaller side has 21 units"):
        RBM(30, 21).sample_exact(2)


def test_forward_and_reverse_ais_sandwich_the_exact_log_z():
    """On a coupled RBM with exact log Z and too few temperatures for either run to be accurate,
    forward AIS is low and reverse AIS from exact samples high on average (Jensen, both ways): the
    mean of 40 runs of each lies more than 2.5 standard errors on its own side of the exact
    value."""
    rbm = random_rbm(16, 12, scale=1.0)
    exact = float(rbm.log_z_exact())
    generator = torch.Generator().manual_seed(0)
    forward = torch.tensor([ais(rbm, 20, 10, generator=generator).log_z for _ in range(40)])
    reverse = torch.tensor([
        ais(rbm, steps=10, reverse_from=rbm.sample_exact(20, generator), generator=generator).log_z
        for _ in range(40)
    ])  # fmt: skip
    for runs, side in ((forward, -1), (reverse, 1)):
        error, se = float(runs.mean()) - exact, float(runs.std()) / 40**0.5
        assert side * error > 2.5 * se, (side, error, se)


def test_the_prior_reports_each_estimator_and_which_way_it_errs():
    """Past the enumeration limit the reverse run starts from the chains and says it is no
    guarantee; with enumeration switched off on a small RBM it starts from exact samples."""
    large = RBMPrior(21, 21, chains=8, ais_chains=8, ais_steps=5)
    report = large.before_evaluation(seed=0)
    assert report["method"] == "ais" and "optimistic" in report["forward"]["bias"]
    assert "persistent chains" in report["reverse"]["bias"]
    assert "not a guarantee" in report["reverse"]["bias"]
    assert report["conservative_log_z"] == max(report["log_z"], report["reverse"]["log_z"])
    small = RBMPrior(6, 5, ais_chains=8, ais_steps=5)
    small.exact_limit = 0
    assert "exact samples" in small.before_evaluation(seed=0)["reverse"]["bias"]


def test_ais_with_too_few_temperatures_misses_and_its_spread_says_so():
    """A negative control: 5 temperatures on a strongly coupled RBM give a poor, widely spread
    estimate, below the exact value (forward AIS under-estimates on average)."""
    rbm = random_rbm(16, 12, 1.5)
    exact = float(rbm.log_z_exact())
    poor = ais(rbm, 200, 5, generator=torch.Generator().manual_seed(0))
    good = ais(rbm, 200, 2000, generator=torch.Generator().manual_seed(0))
    assert poor.log_z < exact - 0.5
    assert poor.report()["log_weight_sd"] > 5 * good.report()["log_weight_sd"]
    assert poor.effective_chains < good.effective_chains


def test_temperature_schedules_and_bad_settings():
    for schedule in ("piecewise", "linear"):
        betas = temperatures(100, schedule)
        assert betas.shape == (101,) and betas[0] == 0 and betas[-1] == 1
        assert (betas.diff() > 0).all()
    piecewise = temperatures(1000)
    assert (piecewise > 0.9).sum() > 0.6 * 1000  # densest near beta = 1
    with pytest.raises(ValueError, match="schedule"):
        temperatures(10, "cosine")
    with pytest.raises(ValueError, match="temperatures"):
        temperatures(0)
    rbm = random_rbm(4, 3)
    with pytest.raises(ValueError, match="base_logits"):
        ais(rbm, 10, 10, base_logits=torch.zeros(5))
    with pytest.raises(ValueError, match="reverse_from"):
        ais(rbm, steps=10, reverse_from=torch.zeros(10, 5))
    with pytest.raises(ValueError, match="chains"):
        RBMPrior(4, 3, chains=0)


def exact_log_z_with_grad(rbm):
    h = binary_states(rbm.units)
    return torch.logsumexp(-rbm.free_energy(h), 0)


def test_the_pcd_surrogate_has_the_gradient_of_log_z():
    """With chains at the model's distribution, grad of the surrogate = grad log Z (exact, by
    autograd through the enumerated log Z); chains elsewhere (uniform) give another gradient."""
    prior = RBMPrior(6, 4, chains=50_000)
    with torch.no_grad():
        for p, q in zip(prior.rbm.parameters(), random_rbm(6, 4, 1.0).parameters(), strict=True):
            p.copy_(q)
    expected = torch.autograd.grad(exact_log_z_with_grad(prior.rbm), list(prior.rbm.parameters()))
    torch.manual_seed(0)
    prior.chains.copy_(exact_samples(prior.rbm, 50_000))
    surrogate = prior.log_normaliser()
    assert surrogate.item() == 0.0  # training: the loss is the ELBO up to log Z
    found = torch.autograd.grad(surrogate, list(prior.rbm.parameters()))
    for f, e in zip(found, expected, strict=True):
        torch.testing.assert_close(f, e, atol=0.02, rtol=0)
    prior.chains.copy_(torch.bernoulli(torch.full((50_000, 6), 0.5)))
    wrong = torch.autograd.grad(prior.log_normaliser(), list(prior.rbm.parameters()))
    assert max((w - e).abs().max() for w, e in zip(wrong, expected, strict=True)) > 0.1


def test_pcd_fits_an_rbm_to_correlated_codes():
    """Maximum likelihood by PCD-5 (the rbm stage's gradient): the exact log-likelihood of codes
    from a coupled RBM rises well above the factorial fit's, to within 0.3 nats of the generating
    RBM's (PCD's estimate fluctuates by ~0.2 nats from step to step at this learning rate)."""
    torch.manual_seed(3)
    teacher = RBM(8, 4, init_scale=2.0)
    with torch.no_grad():  # biases that centre the units: the weights, not the biases, dominate
        teacher.visible_bias.copy_(-0.5 * teacher.weight.sum(1))
        teacher.hidden_bias.copy_(-0.5 * teacher.weight.sum(0))
    torch.manual_seed(1)
    codes = exact_samples(teacher, 4000)
    prior = RBMPrior(8, 6, chains=200, sweeps=5)
    marginal = codes.mean(0).clamp(0.01, 0.99)
    with torch.no_grad():
        prior.rbm.visible_bias.copy_(torch.logit(marginal))  # the factorial fit
    prior.reset_chains(marginal)

    def log_likelihood(rbm):
        with torch.no_grad():
            return float(-rbm.free_energy(codes).mean() - rbm.log_z_exact())

    factorial = log_likelihood(prior.rbm)
    optimiser = torch.optim.Adam(prior.rbm.parameters(), lr=0.01)
    for _ in range(2000):
        batch = codes[torch.randint(len(codes), (100,))]
        loss = prior.rbm.free_energy(batch).mean() + prior.log_normaliser()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        prior.after_step()
    fitted, best = log_likelihood(prior.rbm), log_likelihood(teacher)
    assert best > factorial + 1.0  # the codes are far from factorial
    assert fitted > factorial + 0.8, (factorial, fitted, best)
    assert fitted > best - 0.3, (factorial, fitted, best)


def tiny_hybrid(units=4, hidden=3, stage="joint"):
    torch.manual_seed(0)
    likelihood = make_likelihood("bernoulli", "binary", 1)
    vae = RBMVAE((1, 2, 2), likelihood, latent_units=units, rbm_hidden=hidden, hidden=16, stage=stage)
    with torch.no_grad():
        for p, q in zip(vae.energy.rbm.parameters(), random_rbm(units, hidden, 1.0).parameters(),
                        strict=True):  # fmt: skip
            p.copy_(q)
    return vae


def enumerated_log_marginal(vae, x):
    """log p(x) = logsumexp_h [-F(h) - log Z + log p(x | h)] over all 2^D states, by hand."""
    h = binary_states(vae.h.grid[0])
    log_prior = -vae.energy.rbm.free_energy(h) - vae.energy.rbm.log_z_exact().float()
    logits = vae.decoder(h).view(len(h), 4)
    log_lik = torch.distributions.Bernoulli(logits=logits).log_prob(x.flatten(1)[:, None]).sum(-1)
    return torch.logsumexp(log_prior + log_lik, 1)


@pytest.mark.parametrize("method", ["exact", "ais"])
def test_importance_weighted_bound_of_the_hybrid_approaches_the_enumerated_log_marginal(method):
    """The program's h under the RBM prior, normalised before evaluation (exactly, or by AIS when
    enumeration is switched off), gives IWAE_5000 = log p(x) of the enumerated model."""
    vae = tiny_hybrid()
    if method == "ais":
        vae.energy.exact_limit = 0
    vae.energy.ais_chains, vae.energy.ais_steps = 200, 2000
    x = torch.bernoulli(torch.full((6, 1, 2, 2), 0.5))
    found = diagnose(vae, RelaxedBernoulli(vae.code_sites), x, k=5000, memory_mib=64, collapse=False)
    report = found.summary()["log_normalisers"]["energy"]
    assert report["method"] == method
    with torch.no_grad():
        exact = enumerated_log_marginal(vae, x)
    tolerance = 0.02 if method == "exact" else 0.06
    assert (found.bound - exact.double()).abs().max() < tolerance
    summary = found.summary()
    if method == "exact":
        assert "conservative" not in summary
        return
    assert report["reverse"]["log_z"] > report["forward"]["log_z"] - 0.05
    shift = report["conservative_log_z"] - report["log_z"]
    conservative = summary["conservative"]
    assert conservative["log_z_shift"] == pytest.approx(shift) and shift >= 0
    assert conservative["iwae"] == pytest.approx(summary["iwae"]["mean"] - shift)
    assert conservative["exact_elbo"] == pytest.approx(summary["exact_elbo"]["mean"] - shift)
    assert conservative["iwae"] < float(exact.mean()) + 0.06


def test_the_exact_elbo_under_the_rbm_prior_is_the_enumerated_one():
    """Exact ELBO = E_q[log p(x | h)] - KL(q || p) with log Z exact, enumerated over h."""
    vae = tiny_hybrid()
    x = torch.bernoulli(torch.full((1, 1, 2, 2), 0.5)).expand(4000, 1, 2, 2)
    found = evaluate(vae, RelaxedBernoulli(vae.code_sites), x, collapse=False)
    with torch.no_grad():
        h = binary_states(4)
        q = torch.sigmoid(vae.encoder(x[:1].flatten(1)))[0]
        log_q = (h * q.log() + (1 - h) * (1 - q).log()).sum(-1)
        log_p = -vae.energy.rbm.free_energy(h) - vae.energy.rbm.log_z_exact().float()
        logits = vae.decoder(h).view(16, 4)
        log_lik = torch.distributions.Bernoulli(logits=logits).log_prob(x[0].flatten()).sum(-1)
        elbo = float((log_q.exp() * (log_lik + log_p - log_q)).sum())
    mean, se = found["exact_elbo"]["mean"], found["exact_elbo"]["se"]
    assert abs(mean - elbo) < 4 * se + 1e-3, (mean, se, elbo)


def test_the_rbm_stage_trains_only_the_rbm_and_starts_from_the_factorial_prior():
    vae = tiny_hybrid(stage="rbm")
    with torch.no_grad():
        vae.factorial.copy_(torch.tensor([2.0, -2.0, 0.5, 0.0]))
    vae.start_stage()
    torch.testing.assert_close(vae.energy.rbm.visible_bias, vae.factorial)
    trainable = {name for name, p in vae.named_parameters() if p.requires_grad}
    assert trainable == {"energy.rbm.weight", "energy.rbm.visible_bias", "energy.rbm.hidden_bias"}
    assert not tiny_hybrid(stage="pretrain").energy.active


def hybrid_gradients(vae, loss):
    params = [vae.encoder[0].weight, vae.encoder[-1].bias]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("analytic_only", [True, False])
def test_score_gradients_under_the_rbm_prior_are_unbiased(analytic_only, monkeypatch):
    """The ``score`` family on binary units: the mean NVIL gradient of the encoder equals the
    gradient of the enumerated ELBO. Negative control: removing the site's whole rate from the
    learning signal (right for logits priors only) drops F(h) from it and biases the gradient."""
    from probvq.inference import FAMILIES
    from probvq.inference.objectives import score

    if not analytic_only:
        monkeypatch.setattr(score, "_analytic", lambda trace, name: True)
    vae = tiny_hybrid(units=3, hidden=2)
    fam = FAMILIES["score"].build(vae.code_sites)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((3, 1, 2, 2), 0.5))
    h = binary_states(3)
    probs = torch.sigmoid(vae.encoder(x.flatten(1)))  # (B, 3)
    log_q = (h[:, None] * probs.log() + (1 - h[:, None]) * (1 - probs).log()).sum(-1)  # (8, B)
    log_lik = torch.distributions.Bernoulli(logits=vae.decoder(h)[:, None]).log_prob(x.flatten(1))
    log_p = -vae.energy.rbm.free_energy(h)[:, None]  # log Z does not depend on the encoder
    exact = hybrid_gradients(vae, -(log_q.exp() * (log_lik.sum(-1) + log_p - log_q)).sum())
    elbo = fam.elbo()
    programs = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    repeats, chunks = 300, 30
    estimates = []
    for _ in range(chunks):
        parts = elbo.differentiable_parts(*programs, x.repeat(repeats, 1, 1, 1))
        loss = sum(
            v for found in parts.values() for n, v in found.items() if not n.endswith(".baseline")
        )
        estimates.append(hybrid_gradients(vae, loss / repeats))
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / chunks**0.5
    unbiased = ((mean - exact).abs() < 5 * se + 1e-3 * exact.abs().max()).all()
    assert bool(unbiased) == analytic_only, ((mean - exact).abs() / se).max()


SYNTH = [
    "--model", "rbm", "--family", "bernoulli", "--latent-units", "24", "--rbm-hidden", "24",
    "--hidden", "32", "--train-limit", "256", "--valid-size", "64", "--batch-size", "32",
    "--ais-chains", "20", "--ais-steps", "50", "--pcd-chains", "20", "--quiet",
]  # fmt: skip


def test_the_two_stage_cli_runs_resumes_and_evaluates(tmp_path, monkeypatch, capsys):
    """pretrain,rbm,joint on synthetic binary images: an interrupted stage resumes to the bitwise
    same final state (chains included); evaluate/diagnose/sample open the run's last stage."""
    plan = ["--stages", "pretrain,rbm,joint", "--stage-epochs", "1,1,1"]
    reference = tmp_path / "reference"
    assert main(["train", *SYNTH, *plan, "--out", str(reference)]) == 0
    summary = json.loads((reference / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["pretrain", "rbm", "joint"]
    joint = summary["stages"][-1]["final"]
    assert joint["log_normalisers"]["energy"]["method"] == "ais"
    assert "log_normalisers" not in summary["stages"][0]["final"]  # a factorial prior: no log Z
    record = json.loads((reference / "joint" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss_is"] == "-(ELBO up to log Z)"
    # the rbm stage changed the RBM and nothing else
    pre, fitted = (load_checkpoint(reference / s / "final.pt")["model"] for s in ("pretrain", "rbm"))
    for name in pre:
        same = torch.equal(pre[name], fitted[name])
        assert same != (name.startswith("energy.")), name

    hook, count = train.after_step, [0]

    def interrupting(*modules):
        hook(*modules)
        count[0] += 1
        if count[0] == 12:  # the 4th step of the rbm stage
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "after_step", interrupting)
    out = tmp_path / "run"
    assert main(["train", *SYNTH, *plan, "--out", str(out)]) == 130
    assert (out / "pretrain" / "final.pt").exists() and not (out / "rbm" / "final.pt").exists()
    monkeypatch.setattr(train, "after_step", hook)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    for stage in ("pretrain", "rbm", "joint"):
        assert_bitwise_equal(
            load_checkpoint(out / stage / "final.pt"), load_checkpoint(reference / stage / "final.pt")
        )
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    assert "already finished every stage" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["evaluate", str(out), "--limit", "16", "--quiet", "--no-collapse"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_dir"].endswith("joint") and "log_normalisers" in report
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stages", "pretrain,rbn"], "stages: expected a comma list"),
        (["--stages", "rbm,rbm"], "each stage runs once"),
        (["--stages", "pretrain,joint", "--stage-epochs", "1"], "stage_epochs: expected 2"),
        (["--ais-steps", "0"], "ais_steps: expected a positive integer"),
        (["--family", "vq"], "infers Codebook sites"),
        (["--grid", "4"], "grid: a setting of the 'vqvae' model"),
    ],
)
def test_bad_rbm_settings_are_refused_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", *SYNTH, *flags, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_single_stage_is_an_ordinary_run_and_evaluation_takes_ais_settings(tmp_path, capsys):
    out = tmp_path / "factorial"
    assert main(["train", *SYNTH, "--stages", "pretrain", "--max-steps", "3", "--out", str(out)]) == 0
    assert (out / "final.pt").exists() and not (out / "pretrain").exists()
    run = tmp_path / "joint"
    assert main(["train", *SYNTH, "--max-steps", "3", "--out", str(run)]) == 0  # default: joint
    capsys.readouterr()
    flags = ["--limit", "8", "--quiet", "--no-collapse", "--ais-chains", "7", "--ais-steps", "30"]
    assert main(["evaluate", str(run), *flags]) == 0
    forward = json.loads(capsys.readouterr().out)["log_normalisers"]["energy"]["forward"]
    assert forward["chains"] == 7
    assert main(["evaluate", str(out), *flags]) == 0  # no RBM in use: nothing to normalise
    assert "log_normalisers" not in json.loads(capsys.readouterr().out)


def test_other_models_refuse_rbm_settings(tmp_path, capsys):
    assert main(["train", "--model", "vqvae", "--stages", "pretrain", "--out", str(tmp_path / "r")]) == 2
    assert "stages: a setting of the 'rbm' model" in capsys.readouterr().err


def test_rbm_prior_samples_and_moves_its_chains_only_when_active():
    prior = RBMPrior(5, 3, chains=10)
    before = prior.chains.clone()
    prior.active = False
    prior.after_step()
    assert torch.equal(prior.chains, before) and prior.loss_note is None
    prior.active = True
    torch.manual_seed(0)
    prior.after_step()
    assert not torch.equal(prior.chains, before) and prior.loss_note == "ELBO up to log Z"
    assert prior.sample(torch.Size([7, 2])).shape == (7, 2, 5)
    assert isinstance(prior, nn.Module) and "chains" in prior.state_dict()


def test_free_bits_under_the_rbm_prior_are_refused_by_name_not_applied_silently():
    """The floor would compare itself with KL - log Z (the training log Z has value 0) and zero
    the RBM's gradient; the bound refuses it, the CLI before any work, a factorial stage keeps it."""
    from probvq.inference import FAMILIES

    vae = tiny_hybrid(stage="rbm")
    fam = FAMILIES["bernoulli"].build(vae.code_sites)
    programs = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    x = torch.bernoulli(torch.full((8, 1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="free_bits: site 'h' has an energy prior"):
        fam.elbo(free_bits=0.5).differentiable_loss(*programs, x)
    loss = fam.elbo().differentiable_loss(*programs, x)
    assert torch.autograd.grad(loss, vae.energy.rbm.weight)[0].abs().sum() > 0
    pretrain = tiny_hybrid(stage="pretrain")
    fam = FAMILIES["bernoulli"].build(pretrain.code_sites)
    programs = fam.wrap(pretrain.model, pyro_params=False), fam.wrap(pretrain.guide, pyro_params=False)
    assert torch.isfinite(fam.elbo(free_bits=0.5).differentiable_loss(*programs, x))


@pytest.mark.parametrize("stages", ["pretrain,rbm", "joint"])
def test_the_cli_refuses_free_bits_on_energy_stages_before_any_work(tmp_path, capsys, stages):
    out = tmp_path / "run"
    flags = ["--stages", stages, "--free-bits", "0.5", "--out", str(out)]
    assert main(["train", *SYNTH, *flags]) == 2
    assert "free_bits: the 'rbm' model's stage(s)" in capsys.readouterr().err
    assert not out.exists()
