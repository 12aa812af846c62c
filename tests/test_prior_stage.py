"""PixelCNN priors in the program: the joint rate, the swapped second-stage prior, fit-prior."""

from __future__ import annotations

import json
import shutil

import pyro
import pytest
import torch

from probvq.cli import main
from probvq.codebook import Codebook
from probvq.inference import FAMILIES
from probvq.inference.objectives.terms import elbo_terms, run_traces
from probvq.pixelcnn import GatedPixelCNN, UpperContext
from probvq.priors import AutoregressiveCodes
from probvq.sites import CodeSite, code
from probvq.swap import WithPriors


class Grid(torch.nn.Module):
    """A 1 x 2 grid of K = 3 codes under a PixelCNN prior; the guide's features are given."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.z = CodeSite("z", Codebook(3, 2, init="normal"), (1, 2))
        self.prior = GatedPixelCNN(3, 2, hidden=8, layers=2, kernel=3)
        self.zhat = torch.randn(1, 1, 2, 2).expand(batch, 1, 2, 2)
        self.code_sites = [self.z]

    def model(self) -> None:
        with pyro.plate("data", self.zhat.shape[0]):
            code(self.z, self.prior)

    def guide(self) -> None:
        with pyro.plate("data", self.zhat.shape[0]):
            code(self.z, self.prior, features=self.zhat)


@pytest.mark.parametrize("name", ["sq", "gumbel", "vq"])
def test_a_jointly_trained_pixelcnn_prior_pays_the_enumerated_kl(name):
    torch.manual_seed(0)
    grid = Grid(batch=4000)
    fam = FAMILIES[name].build([grid.z])
    with torch.no_grad(), fam.exact():
        model_trace, guide_trace = run_traces(
            fam.wrap(grid.model, pyro_params=False), fam.wrap(grid.guide, pyro_params=False)
        )
        rate = elbo_terms(model_trace, guide_trace).rate["z"].double()
        base = guide_trace.nodes["z"]["fn"].base_dist  # every row has the same features: row 0
        if hasattr(base, "logits"):
            per_position = torch.log_softmax(base.logits[0, 0], -1).double()  # (2, K)
        else:  # vq's point mass
            per_position = torch.nn.functional.one_hot(base.index[0, 0], 3).double().log()
        pairs = torch.cartesian_prod(torch.arange(3), torch.arange(3))
        log_q = per_position[0, pairs[:, 0]] + per_position[1, pairs[:, 1]]
        codes = grid.z.space.code_of_index(pairs.view(9, 1, 2))
        log_p = AutoregressiveCodes(grid.prior, grid.z.space, (1, 2)).log_prob(codes).double()
    terms = torch.where(log_q > -torch.inf, log_q.exp() * (log_q - log_p), 0.0)
    exact = float(terms.sum())
    se = float(rate.std()) / len(rate) ** 0.5
    assert abs(float(rate.mean()) - exact) < 4 * se + 1e-6, (float(rate.mean()), exact, se)


def test_a_swapped_prior_is_the_prior_of_the_program_and_only_of_its_site():
    torch.manual_seed(1)
    grid = Grid(batch=8)
    other = GatedPixelCNN(3, 2, hidden=8, layers=2, kernel=3)
    swapped = WithPriors(grid, {"z": other})
    fam = FAMILIES["vq"].build([grid.z])
    with torch.no_grad():
        model_trace, guide_trace = run_traces(
            fam.wrap(swapped.model, pyro_params=False), fam.wrap(swapped.guide, pyro_params=False)
        )
        value = guide_trace.nodes["z"]["value"]
        rate = elbo_terms(model_trace, guide_trace).rate["z"]
        expected = -AutoregressiveCodes(other, grid.z.space, (1, 2)).log_prob(value)
    torch.testing.assert_close(rate, expected)  # vq's rate is -log p(z*) under the new prior
    assert list(swapped.swapped) == ["z"] and swapped.code_sites == [grid.z]
    with pytest.raises(ValueError, match="not code sites"):
        WithPriors(grid, {"y": other})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "run"
    args = ["train", "--hidden", "16", "--num-codes", "8", "--code-dim", "4", "--max-steps", "20",
            "--train-limit", "256", "--valid-size", "64", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


def test_fit_prior_caches_codes_resumes_and_lowers_the_rate(run, capsys):
    fit = ["fit-prior", str(run), "--hidden", "16", "--layers", "2", "--lr", "0.003", "--quiet"]
    assert main([*fit, "--epochs", "1"]) == 0
    first = json.loads(capsys.readouterr().out)
    codes = (run / "prior-z" / "codes.pt").stat().st_mtime_ns
    assert main([*fit, "--epochs", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["epoch"] for r in report["history"]] == [1, 2, 3]
    assert report["history"][0] == first["history"][0]  # continued, not restarted
    assert (run / "prior-z" / "codes.pt").stat().st_mtime_ns == codes  # extracted once
    assert report["history"][-1]["valid_nll"] < report["uniform_nll"]
    assert main([*fit[:-3], "--epochs", "4", "--lr", "0.01", "--quiet"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err

    def rate(*extra):
        assert main(["evaluate", str(run), "--quiet", "--no-collapse", "--limit", "64", *extra]) == 0
        return json.loads(capsys.readouterr().out)["rate"]["z"]["mean"]

    uniform, fitted = rate(), rate("--prior", "pixelcnn")
    assert uniform == pytest.approx(report["uniform_nll"], rel=1e-6)  # vq under a uniform prior
    assert fitted < uniform - 0.5
    out = run.parent / "samples.png"
    assert (
        main(["sample", str(run), "--prior", "pixelcnn", "--n", "4", "--out", str(out), "--quiet"]) == 0
    )
    capsys.readouterr()
    assert main([*fit, "--site", "y"]) == 2
    assert "--site" in capsys.readouterr().err


def test_evaluate_refuses_a_missing_fitted_prior(tmp_path, run, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("prior-*"))
    assert main(["evaluate", str(copy), "--prior", "pixelcnn", "--quiet"]) == 2
    assert "fit-prior" in capsys.readouterr().err


def test_a_lower_layer_prior_reads_the_codes_above_it(tmp_path, capsys):
    run = tmp_path / "hq"
    args = ["train", "--model", "hqvae", "--hidden", "16", "--num-codes", "8", "--code-dim", "4",
            "--max-steps", "6", "--train-limit", "96", "--valid-size", "32", "--quiet",
            "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    fit = ["fit-prior", str(run), "--hidden", "8", "--layers", "2", "--epochs", "1", "--quiet"]
    assert main([*fit, "--site", "z1", "--context", "z2"]) == 2
    assert "must be a layer above" in capsys.readouterr().err
    assert main(fit) == 0 and main([*fit, "--site", "z2", "--context", "z1"]) == 0
    capsys.readouterr()
    assert (
        main(["evaluate", str(run), "--prior", "pixelcnn", "--quiet", "--no-collapse", "--limit", "8"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["prior"] == "pixelcnn" and set(report["rate"]) == {"z1", "z2"}
    out = tmp_path / "grid.png"
    assert (
        main(["sample", str(run), "--prior", "pixelcnn", "--n", "3", "--out", str(out), "--quiet"]) == 0
    )


def test_the_upper_context_changes_the_lower_prior():
    torch.manual_seed(5)
    net = GatedPixelCNN(4, 3, hidden=8, layers=2, kernel=3, context_channels=2)
    prior = UpperContext(net, "top", (4, 4))
    value = torch.randn(2, 4, 4, 3)
    a = prior({"top": torch.randn(2, 2, 2, 2)}).conditional_logits(value)
    b = prior({"top": torch.randn(2, 2, 2, 2)}).conditional_logits(value)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="has not been drawn yet"):
        prior({})
