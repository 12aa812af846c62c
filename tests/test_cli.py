import json
import subprocess
import sys

import pytest
import torch
import xarray as xr

from probvq.cli import main
from probvq.inference import load_checkpoint, save_checkpoint
from probvq.inference.training.checkpoint import RunDir

TINY = [
    "--quiet", "--max-steps", "12", "--eval-every", "6", "--hidden", "8", "--res-blocks", "0",
    "--num-codes", "8", "--code-dim", "4", "--train-limit", "300", "--valid-size", "50",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sq"
    assert main(["train", "--family", "sq", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_a_complete_run_directory(run_dir, capsys):
    names = {p.name for p in run_dir.iterdir()}
    assert names == {
        "config.json", "run.json", "metrics.jsonl", "best.pt", "final.pt", "last.pt",
        "summary.json",
    }  # fmt: skip
    config = json.loads((run_dir / "config.json").read_text())
    assert config["family"] == "sq" and config["codebook_init"] == "normal"
    assert config["likelihood"] == "bernoulli"
    records = RunDir(run_dir).read_log()
    assert [r["step"] for r in records] == [6, 12]
    assert {"loss", "temperature", "valid"} <= set(records[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and "perplexity" in summary["best"]
    state = load_checkpoint(run_dir / "final.pt")
    assert state["step"] == 12 and state["config"]["family"] == "sq"


def test_evaluate_prints_one_json_object(run_dir, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--limit", "40", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 40 and report["checkpoint"] == "best"
    for key in ("exact_elbo", "exact_bits_per_dim", "surrogate_elbo", "surrogate_gap",
                "perplexity", "dead_codes", "reconstruction_mse"):  # fmt: skip
        assert key in report


def test_evaluate_matches_the_training_log_on_the_same_slice(run_dir, capsys):
    capsys.readouterr()
    main(["evaluate", str(run_dir), "--checkpoint", "final", "--limit", "50", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    logged = RunDir(run_dir).read_log()[-1]["valid"]
    assert report["exact_elbo"]["mean"] == pytest.approx(logged["exact_elbo"]["mean"], rel=1e-5)


def test_diagnose_writes_summary_netcdf_and_plots(run_dir, tmp_path, capsys):
    out = tmp_path / "diag"
    capsys.readouterr()
    args = ["diagnose", str(run_dir), "--k", "40", "--limit", "10", "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary and summary["examples"] == 10 and summary["iwae"]["k"] == 40
    assert {"iwae_curve", "pareto_khat", "rate", "distortion", "perplexity", "surrogate_gap"} <= set(
        summary
    )
    plots = {f"plots/{name}.png" for name in ("training_curves", "rates", "codebook_usage", "khat")}
    assert {"diagnostics.nc", "plots/reconstructions.png", *plots} == set(summary["files"])
    assert all((out / name).is_file() for name in summary["files"])
    with xr.open_dataset(out / "diagnostics.nc", group="training_log", engine="h5netcdf") as log:
        assert list(log.step.values) == [r["step"] for r in RunDir(run_dir).read_log()]
    before = (out / "summary.json").read_bytes()
    assert main(args) == 2  # a second run refuses the directory and changes nothing
    assert "already exists" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k", "0"], "k: expected"),
        (["--memory-mib", "-1"], "memory_mib"),
        (["--memory-mib", "inf"], "memory_mib"),
        (["--batch-size", "0"], "batch_size"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_diagnose_refuses_bad_settings_before_any_work(run_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "diag"
    assert main(["diagnose", str(run_dir), "--out", str(out), "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_diagnose_that_fails_midway_leaves_nothing_behind(run_dir, tmp_path, monkeypatch, capsys):
    import probvq.cli

    def broken(*args):
        raise ValueError("plotting failed")

    monkeypatch.setattr(probvq.cli, "write_plots", broken)
    out = tmp_path / "diag"
    assert (
        main(["diagnose", str(run_dir), "--k", "30", "--limit", "4", "--out", str(out), "--quiet"]) == 2
    )
    assert "plotting failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_run_is_never_overwritten(run_dir, capsys):
    before = (run_dir / "final.pt").read_bytes()
    assert main(["train", "--out", str(run_dir), *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "final.pt").read_bytes() == before


def test_config_file_and_flag_precedence(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('family = "rr"\nnum_codes = 6\n')
    out = tmp_path / "out"
    flags = ["--config", str(tmp_path / "run.toml"), "--out", str(out), *TINY, "--num-codes", "5"]
    assert main(["train", *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["family"], config["num_codes"]) == ("rr", 5)
    (tmp_path / "bad.toml").write_text("colour = 'red'\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown settings ['colour']" in capsys.readouterr().err
    (tmp_path / "typed.json").write_text('{"vq": {"ema": "false"}}')
    assert main(["train", "--config", str(tmp_path / "typed.json")]) == 2
    assert "ema: expected bool" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "/no/such/path"], "no such file"),
        (["train", "--num-codes", "1"], "K >= 2"),
        (["train", "--temperature", "0"], "temperature"),
        (["train", "--family", "gumbol"], "family"),
        (["train", "--grid", "5"], "power of two"),
        (["train", "--config", "/no/such.toml"], "--config"),
        (["evaluate", "/no/such/run"], "config.json"),
        (["train", "--family", "bogus", "--data", "/no/such/path"], "family"),
        (["train", "--codebook-init", "zeros"], "codebook_init"),
        (["train", "--seed", "-1"], "seed"),
    ],
)
def test_bad_input_fails_with_one_clear_line(args, message, capsys, tmp_path):
    assert (
        main([*args, "--quiet"] if args[0] == "evaluate" else [*args, "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("probvq: error:") and message in err
    assert not (tmp_path / "o").exists()


def test_corrupted_or_foreign_checkpoints_are_refused(tmp_path, run_dir, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a probvq checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    for name in ("config.json", "run.json"):
        (broken / name).write_text((run_dir / name).read_text())
    (broken / "best.pt").write_bytes((run_dir / "best.pt").read_bytes()[:100])
    assert main(["evaluate", str(broken), "--quiet"]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_altered_checkpoint_contents_are_detected(tmp_path, run_dir):
    state = torch.load(run_dir / "final.pt", weights_only=True)
    state["model"]["z.space.weight"][0, 0] += 1.0
    torch.save(state, tmp_path / "altered.pt")
    with pytest.raises(ValueError, match="digest"):
        load_checkpoint(tmp_path / "altered.pt")


def test_run_files_get_the_usual_permissions(run_dir):
    import os

    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "best.pt", "summary.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_torn_last_log_line_is_left_out(tmp_path, run_dir):
    copy = tmp_path / "copy"
    copy.mkdir()
    text = (run_dir / "metrics.jsonl").read_text()
    (copy / "metrics.jsonl").write_text(text + '{"step": 18, "lo')
    assert len(RunDir(copy).read_log()) == len(RunDir(run_dir).read_log())


def test_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises((TypeError, AttributeError)):  # unpicklable: the save fails midway
        save_checkpoint(path, {"step": 2, "bad": lambda: None})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_python_dash_m_runs_the_same_cli():
    result = subprocess.run(
        [sys.executable, "-m", "probvq", "evaluate", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "run_dir" in result.stdout


def test_subset_draws_seeded_examples_and_says_so(run_dir, capsys):
    def report(*flags):
        capsys.readouterr()
        assert main(["evaluate", str(run_dir), "--quiet", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    first, again, other = (
        report("--subset", "30"),
        report("--subset", "30"),
        report("--subset", "30", "--seed", "1"),
    )
    assert first["examples"] == 30 and first["subset"] == 30 and first["subset_seed"] == 0
    assert first["split_size"] == 1000 and "limit" not in first
    assert first["exact_elbo"] == again["exact_elbo"]
    assert other["exact_elbo"] != first["exact_elbo"]  # other examples (and another code draw)
    limited = report("--limit", "30")
    assert limited["limit"] == 30 and "subset" not in limited
