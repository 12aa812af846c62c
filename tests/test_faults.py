"""Faults during training: non-finite steps are skipped and named, divergence stops the run keeping
its last good checkpoint, and file-system errors leave no orphan directory or half-written file."""

import contextlib
import errno
import json

import pyro
import pytest
import torch
from conftest import built_run

from probvq.cli import main
from probvq.inference import RunDir, fit, load_checkpoint
from probvq.inference.training import checkpoint
from probvq.inference.training.train import DivergenceError

SMALL = dict(
    num_codes=8, code_dim=4, hidden=8, res_blocks=0, batch_size=16, train_limit=200, valid_size=32,
    quiet=True,
)  # fmt: skip
TINY = [
    "--quiet", "--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--hidden", "8",
    "--res-blocks", "0", "--num-codes", "8", "--code-dim", "4", "--train-limit", "100",
    "--valid-size", "20", "--batch-size", "16",
]  # fmt: skip


def setup(family="sq", **overrides):
    config, vae, fam, train_x, valid_x = built_run(SMALL, family, **overrides)
    return config, vae, fam, train_x, valid_x


def poison(vae, steps, site="poison"):
    """Add a NaN factor to the model at the given training calls (1-based)."""
    original, calls = vae.model, [0]

    def model(x):
        original(x)
        if vae.training and torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] in steps:
                pyro.factor(site, torch.tensor(float("nan")))

    vae.model = model


def test_a_nan_loss_skips_the_step_and_names_the_site(tmp_path, capsys):
    config, vae, family, train_x, valid_x = setup(max_steps=8, eval_every=8)
    poison(vae, {3, 4})
    run = RunDir.create(tmp_path / "run", config.to_dict())
    result = fit(vae, family, train_x, valid_x, config, run)
    assert [(f["step"], f["kind"], f["where"]) for f in result.faults] == [
        (3, "loss", ["poison"]),
        (4, "loss", ["poison"]),
    ]
    logged = RunDir(run.path).read_log("faults")
    assert [(f["step"], f["where"]) for f in logged] == [(3, ["poison"]), (4, ["poison"])]
    assert "step 3 skipped: loss nan at site 'poison'" in capsys.readouterr().err
    state = load_checkpoint(run.checkpoint("final"))
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6.0}  # 8 steps, 2 skipped: Adam moved 6 times
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_nan_gradient_names_the_parameters():
    config, vae, family, train_x, valid_x = setup(max_steps=4, eval_every=4)
    weight = next(vae.decoder.parameters())
    calls = [0]

    def corrupt(grad):
        calls[0] += 1
        return grad * float("nan") if calls[0] == 2 else grad

    weight.register_hook(corrupt)
    faults = fit(vae, family, train_x, valid_x, config).faults
    assert len(faults) == 1 and faults[0]["step"] == 2 and faults[0]["kind"] == "gradient"
    assert faults[0]["where"] == ["model.decoder.0.weight"]


def test_skipped_steps_forget_their_codebook_statistics():
    def ema_count(poisoned, steps):
        config, vae, family, train_x, valid_x = setup(
            "vq", family_settings={"ema": True}, max_steps=steps, eval_every=steps, max_bad_steps=3
        )
        poison(vae, poisoned)
        with contextlib.suppress(DivergenceError):
            fit(vae, family, train_x, valid_x, config)
        assert vae.codebook._pending is None
        return vae.codebook.ema_count.clone()

    after_one = ema_count(set(), 1)
    assert not torch.equal(after_one, torch.ones_like(after_one))
    assert torch.equal(ema_count({2, 3, 4}, 4), after_one)  # steps 2-4 committed nothing


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config, vae, family, train_x, valid_x = setup(
        max_steps=20, eval_every=2, checkpoint_every=2, max_bad_steps=3
    )
    poison(vae, set(range(6, 21)), site="x_poison")
    run = RunDir.create(tmp_path / "run", config.to_dict())
    with pytest.raises(DivergenceError) as caught:
        fit(vae, family, train_x, valid_x, config, run)
    message = str(caught.value)
    assert "stopped at step 8" in message and "'x_poison'" in message
    assert f"{run.checkpoint('last')} (step 4)" in message
    assert load_checkpoint(run.checkpoint("last"))["step"] == 4
    assert not run.checkpoint("final").exists()


def test_a_fresh_run_that_fails_before_any_checkpoint_leaves_no_directory(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    out = tmp_path / "deep" / "run"
    assert main(["train", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"probvq: error: cannot write {out}/best.pt: No space left on device"
    assert list(tmp_path.iterdir()) == []  # no run directory, no parent, no temporary file


def test_a_write_failure_mid_run_keeps_the_good_checkpoints(tmp_path, monkeypatch, capsys):
    save, calls = checkpoint.torch.save, [0]

    def filling(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 2:  # best.pt and last.pt at step 3 are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        save(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", filling)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["step"] == 3
    assert not list(out.glob(".*")), "a temporary file was left behind"
    monkeypatch.setattr(checkpoint.torch, "save", save)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_an_unwritable_parent_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker / "run"), *TINY]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
