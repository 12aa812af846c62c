"""Stability devices for deep hierarchies: KL warm-up, free bits, spike skipping, rate reports."""

import json
import math

import pyro
import pytest
import torch
from conftest import built_run

from probvq.cli import main
from probvq.inference import FAMILIES, CodeELBO, fit
from probvq.inference.training import train as engine
from probvq.warmup import RateScale, warmup_weight

DEEP = dict(model="deep", num_layers=3, hidden=8, res_blocks=0, num_codes=8, code_dim=4,
            batch_size=32, train_limit=320, valid_size=64, quiet=True)  # fmt: skip


def parts(tiny, x, family, beta=1.0, free_bits=0.0, seed=0):
    scale = RateScale(beta)
    programs = (scale(family.wrap(tiny.model, pyro_params=False)),
                scale(family.wrap(tiny.guide, pyro_params=False)))  # fmt: skip
    pyro.set_rng_seed(seed)
    return CodeELBO(free_bits=free_bits).differentiable_parts(*programs, x)


@pytest.mark.parametrize("name", ["vq", "sq", "rr"])
def test_warmup_scales_the_rate_and_nothing_else(tiny, tiny_data, name):
    family = FAMILIES[name].build(tiny.code_sites)
    family.eval()
    full = parts(tiny, tiny_data, family)
    for beta in (0.0, 0.3):
        warm = parts(tiny, tiny_data, family, beta=beta)
        for kind in ("distortion", "regulariser"):
            assert warm[kind].keys() == full[kind].keys()
            for site, value in full[kind].items():
                assert torch.allclose(warm[kind][site], value)
        for site, value in full["rate"].items():
            assert torch.allclose(warm["rate"][site], beta * value)
    assert full["rate"]  # there is a rate to scale


def test_free_bits_floor_the_batch_rate_and_stop_its_gradient(tiny, tiny_data):
    family = FAMILIES["rr"].build(tiny.code_sites)
    family.eval()
    plain = parts(tiny, tiny_data, family)
    assert all(torch.allclose(parts(tiny, tiny_data, family, free_bits=1e-9)["rate"][n], v)
               for n, v in plain["rate"].items())  # fmt: skip
    floor = 50.0  # far above the tiny model's rate (a few nats)
    floored = parts(tiny, tiny_data, family, beta=0.5, free_bits=floor)
    assert float(floored["rate"]["z"].detach()) == pytest.approx(0.5 * floor * tiny_data.shape[0])
    floored["rate"]["z"].backward()
    assert all(p.grad is None or not p.grad.any() for p in tiny.encoder.parameters())
    with pytest.raises(ValueError, match="free_bits"):
        CodeELBO(free_bits=-1.0)


def test_warmup_weight_rises_linearly():
    assert [warmup_weight(t, 4) for t in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert warmup_weight(3, 0) == 1.0
    with pytest.raises(ValueError, match="beta"):
        RateScale(-0.1)


def test_training_logs_beta_and_per_layer_rates_that_sum_to_the_total():
    config, vae, family, train_x, valid_x = built_run(DEEP, "rr", max_steps=20, eval_every=5,
                                                      kl_warmup=10)  # fmt: skip
    result = fit(vae, family, train_x, valid_x[:64], config)
    assert [r["beta"] for r in result.history] == [0.5, 1.0, 1.0, 1.0]
    for record in result.history:
        layers = record["terms"]["rate"]
        assert set(layers) == {"z1", "z2", "z3"}
        assert sum(layers.values()) == pytest.approx(record["rate"], rel=1e-5, abs=1e-6)
        losses = [v for found in record["terms"].values() for v in found.values()]
        assert sum(losses) == pytest.approx(record["loss"], rel=1e-5)


def train_with_norms(monkeypatch, steps, scale):
    """A seeded deep run with ``skip_spikes=5`` whose step-t gradient norm is ``scale(t)`` times
    the true one (the engine's only read of the norm)."""
    config, vae, family, train_x, valid_x = built_run(DEEP, "rr", max_steps=steps, eval_every=steps,
                                                      skip_spikes=5.0)  # fmt: skip
    real = torch.nn.utils.get_total_norm
    calls = []

    def scaled(grads, *args, **kwargs):
        calls.append(1)
        return real(grads, *args, **kwargs) * scale(len(calls))

    monkeypatch.setattr(engine.nn.utils, "get_total_norm", scaled)
    return family, fit(vae, family, train_x, valid_x[:64], config)


def test_a_gradient_spike_is_skipped_and_logged(monkeypatch):
    family, result = train_with_norms(monkeypatch, 40, lambda t: 100.0 if t == 30 else 1.0)
    assert [(f["step"], f["kind"]) for f in result.faults] == [(30, "spike")]
    assert result.faults[0]["norm"] > result.faults[0]["threshold"]
    assert int(family.steps) == 39  # the temperature schedule skipped the spiking step


def test_a_lasting_rise_in_the_gradient_norm_is_followed_not_fought(monkeypatch):
    _, result = train_with_norms(monkeypatch, 80, lambda t: 1000.0 if t > 30 else 1.0)
    skipped = [f["step"] for f in result.faults]  # and no DivergenceError
    assert skipped and skipped[0] == 31 and len(skipped) <= 51  # until the median catches up
    assert skipped == list(range(31, 31 + len(skipped)))


def test_deep_runs_from_the_cli_and_samples_ancestrally(tmp_path, capsys):
    run = tmp_path / "deep"
    flags = ["--model", "deep", "--num-layers", "3", "--levels", "2", "--hidden", "8",
             "--res-blocks", "0", "--num-codes", "8", "--code-dim", "4", "--train-limit", "256",
             "--valid-size", "64", "--max-steps", "8", "--eval-every", "4", "--family", "rr",
             "--kl-warmup", "4", "--free-bits", "0.1", "--quiet"]  # fmt: skip
    assert main(["train", *flags, "--out", str(run)]) == 0
    capsys.readouterr()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["valid"]["rate"]) == {"z1", "z2", "z3"}
    assert main(["sample", str(run), "--n", "9", "--out", str(tmp_path / "prior.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept"] == [] and (tmp_path / "prior.png").stat().st_size > 0
    args = ["sample", str(run), "--n", "4", "--resample-from", "1", "--image", "3"]
    assert main([*args, "--out", str(tmp_path / "top.png")]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == ["z3", "z2"]
    for extra, message in (
        (["--resample-from", "4"], "--resample-from: expected a layer 0 to 3"),
        (["--out", str(tmp_path / "prior.png")], "exists"),
        (["--out", str(tmp_path / "grid.jpg")], "expected a .png"),
        (["--n", "0"], "--n: expected a positive number"),
    ):
        out = [] if "--out" in extra else ["--out", str(tmp_path / "x.png")]
        assert main(["sample", str(run), *out, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_deep_models_8bit_images_in_bits_per_dim(tmp_path, capsys):
    run = tmp_path / "rgb"
    flags = ["--model", "deep", "--dataset", "synthetic-rgb", "--num-layers", "2", "--grid", "4",
             "--levels", "2", "--hidden", "8", "--res-blocks", "0", "--num-codes", "8",
             "--code-dim", "4", "--train-limit", "128", "--valid-size", "32", "--max-steps", "4",
             "--family", "sq", "--quiet"]  # fmt: skip
    assert main(["train", *flags, "--out", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])["final"]
    assert summary["observed_dims"] == 3 * 32 * 32
    nats = -summary["exact_elbo"]["mean"]
    assert summary["exact_bits_per_dim"] == pytest.approx(nats / (3 * 32 * 32 * math.log(2)))
    assert json.loads((run / "config.json").read_text())["likelihood"] == "logistic"
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "rgb.png")]) == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "vqvae", "--num-layers", "4"], "num_layers: a setting of the 'deep' model"),
        (["--model", "deep", "--prior", "learned"], "prior: a setting of the 'vqvae' model"),
        (["--model", "deep", "--num-layers", "33"], "num_layers: expected 1 to 32"),
        (["--kl-warmup", "-1"], "kl_warmup: expected a non-negative"),
        (["--free-bits", "nan"], "free_bits: expected non-negative"),
        (["--skip-spikes", "1"], "skip_spikes: expected a factor above 1"),
    ],
)
def test_bad_stability_and_depth_settings_are_refused(flags, message, tmp_path, capsys):
    assert main(["train", *flags, "--max-steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
