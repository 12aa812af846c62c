"""Bad input, table-driven: every case fails in one line naming its culprit, and changes no file.

Each case builds its arguments (and any bad file it needs) in a fresh directory, next to two finished
runs. After the command, every file of both runs and of the case's directory must be byte-for-byte
what it was, and nothing new may exist: a refused command writes nothing.
"""

import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from probvq.cli import main

TINY = [
    "--quiet", "--max-steps", "4", "--eval-every", "4", "--hidden", "8", "--res-blocks", "0",
    "--num-codes", "8", "--code-dim", "4", "--train-limit", "100", "--valid-size", "20",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", "0"), ("b", "1")):
        assert main(["train", "--out", str(root / name), "--seed", seed, *TINY]) == 0
    return root


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {
        str(p): p.read_bytes() if p.is_file() else b"<dir>"
        for root in roots
        for p in sorted(root.rglob("*"))
    }


def copy_run(runs: Path, tmp: Path, name: str = "a") -> Path:
    return Path(shutil.copytree(runs / name, tmp / f"copy-{name}"))


def npz(tmp: Path, name: str, **arrays) -> str:
    np.savez(tmp / name, **arrays)
    return str(tmp / name)


def train(*args: str) -> list[str]:
    return ["train", *TINY, *args]


def damaged(runs: Path, tmp: Path, how) -> str:
    run = copy_run(runs, tmp)
    how(run)
    return str(run)


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def flip_byte(path: Path) -> None:
    """Flip one byte in the middle of the record of the model's largest parameter.

    (A byte elsewhere may land in the zip's alignment padding, or in the unused part of a storage
    that a saved view shares: the checkpoint then loads unchanged, and rightly so.)"""
    state = torch.load(path, map_location="cpu", weights_only=True)
    largest = max(state["model"].values(), key=lambda t: t.numel())
    size = largest.untyped_storage().nbytes()
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if i.file_size == size and "/data/" in i.filename)
    offset = member.header_offset
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])
    data[offset + 30 + name_length + extra_length + member.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign_best(runs: Path, tmp: Path) -> str:
    run = copy_run(runs, tmp)
    shutil.copy(runs / "b" / "best.pt", run / "best.pt")
    return str(run)


def swapped_config(runs: Path, tmp: Path) -> str:
    run = copy_run(runs, tmp)
    config = json.loads((run / "config.json").read_text())
    config["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(config))
    return str(run)


def torn_log(runs: Path, tmp: Path) -> str:
    run = copy_run(runs, tmp)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text('{"step": 2, "lo\n' + text)
    return str(run)


def write(tmp: Path, name: str, text: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def empty_dir(tmp: Path) -> str:
    (tmp / "nothing").mkdir()
    return str(tmp / "nothing")


def a_file(tmp: Path) -> str:
    return write(tmp, "plain", "I am a file")


def occupied(tmp: Path) -> str:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "notes.txt").write_text("keep me")
    return str(tmp / "taken")


# (case id, function of (runs, tmp) -> argv, text the one-line error must contain)
CASES = [
    # -- data -------------------------------------------------------------------------------------
    ("data-missing", lambda r, t: train("--data", str(t / "nope.npz")), "nope.npz"),
    ("data-empty", lambda r, t: train("--data", npz(t, "e.npz", x=np.zeros((0, 784)))), "empty"),
    ("data-nan", lambda r, t: train("--data", npz(t, "n.npz", x=np.full((20, 784), np.nan))), "NaN"),
    ("data-pickled", lambda r, t: train("--data", npz(t, "p.npz", x=np.array([{}, {}]))), "pickled"),
    ("data-not-square", lambda r, t: train("--data", npz(t, "s.npz", x=np.zeros((20, 785)))), "785"),
    ("data-unknown-format", lambda r, t: train("--data", write(t, "d.txt", "1 0 1")), "d.txt"),
    ("data-corrupt-npz", lambda r, t: train("--data", write(t, "c.npz", b"PK\x03garbage")), "c.npz"),
    ("data-empty-dir", lambda r, t: train("--data", empty_dir(t)), "nothing"),
    (
        "data-not-binary-under-bernoulli",
        lambda r, t: train(
            "--likelihood", "bernoulli", "--data", npz(t, "g.npz", x=np.full((20, 784), 7, np.uint8))
        ),
        "data (train)",
    ),
    ("data-one-example", lambda r, t: train("--data", npz(t, "o.npz", x=np.zeros((1, 784)))), "o.npz"),
    (
        "data-strings",
        lambda r, t: train("--data", npz(t, "t.npz", x=np.array([["a"] * 4] * 4))),
        "dtype",
    ),
    (
        "evaluate-data-other-size",
        lambda r, t: ["evaluate", str(r / "a"), "--data", npz(t, "big.npz", x=np.zeros((20, 32, 32)))],
        "--data",
    ),
    ("train-limit-zero", lambda r, t: train("--train-limit", "0"), "train_limit"),
    # -- settings ---------------------------------------------------------------------------------
    ("num-codes-one", lambda r, t: train("--num-codes", "1"), "num_codes"),
    ("temperature-zero", lambda r, t: train("--family", "rr", "--temperature", "0"), "temperature"),
    (
        "temperature-min-above-initial",
        lambda r, t: train("--family", "rr", "--temperature", "0.5", "--temperature-min", "2.0"),
        "temperature minimum",
    ),
    ("family-unknown", lambda r, t: train("--family", "gumbel-max"), "family"),
    ("grid-not-power-of-two", lambda r, t: train("--grid", "5"), "grid"),
    ("lr-negative-exponent", lambda r, t: train("--lr", "-1e-3"), "lr"),
    ("lr-nan", lambda r, t: train("--lr", "nan"), "lr"),
    ("batch-size-zero", lambda r, t: train("--batch-size", "0"), "batch_size"),
    ("epochs-zero", lambda r, t: train("--epochs", "0"), "epochs"),
    ("seed-negative", lambda r, t: train("--seed", "-1"), "seed"),
    ("codebook-init-unknown", lambda r, t: train("--codebook-init", "zeros"), "codebook_init"),
    ("likelihood-unknown", lambda r, t: train("--likelihood", "poisson"), "likelihood"),
    ("prior-unknown", lambda r, t: train("--prior", "fancy"), "prior"),
    ("vq-flag-under-rr", lambda r, t: train("--family", "rr", "--beta", "0.5"), "--beta"),
    ("device-unknown", lambda r, t: train("--device", "tpu"), "--device"),
    ("device-cuda-absent", lambda r, t: train("--device", "cuda:7"), "--device"),
    ("clip-norm-zero", lambda r, t: train("--clip-norm", "0"), "clip_norm"),
    ("checkpoint-every-zero", lambda r, t: train("--checkpoint-every", "0"), "checkpoint_every"),
    ("max-bad-steps-zero", lambda r, t: train("--max-bad-steps", "0"), "max_bad_steps"),
    ("precision-unknown", lambda r, t: train("--precision", "fp8"), "precision"),
    ("restart-threshold-negative", lambda r, t: train("--restart-threshold", "-1"), "restart_threshold"),
    # -- config files -----------------------------------------------------------------------------
    ("config-missing", lambda r, t: train("--config", str(t / "no.toml")), "no.toml"),
    ("config-yaml", lambda r, t: train("--config", write(t, "c.yaml", "lr: 0.1\n")), "YAML"),
    ("config-bad-toml", lambda r, t: train("--config", write(t, "c.toml", "lr = = 1\n")), "c.toml"),
    ("config-unknown-key", lambda r, t: train("--config", write(t, "c.toml", "colour = 1\n")), "colour"),
    (
        "config-wrong-type",
        lambda r, t: train("--config", write(t, "c.json", '{"vq": {"ema": "false"}}')),
        "ema",
    ),
    (
        "config-other-family-section",
        lambda r, t: train("--config", write(t, "c.toml", 'family = "rr"\n[vq]\nbeta = 0.3\n')),
        "vq",
    ),
    ("config-not-a-table", lambda r, t: train("--config", write(t, "c.json", "[1, 2]")), "c.json"),
    ("config-binary", lambda r, t: train("--config", write(t, "c.toml", b"\xff\xfe\x00")), "c.toml"),
    # -- paths ------------------------------------------------------------------------------------
    ("out-empty", lambda r, t: train("--out", ""), "out: expected a directory path"),
    ("out-existing-run", lambda r, t: train("--out", str(r / "a")), "already exists"),
    ("out-occupied", lambda r, t: train("--out", occupied(t)), "taken"),
    ("out-under-a-file", lambda r, t: train("--out", a_file(t) + "/run"), "not a directory"),
    ("out-under-dev-null", lambda r, t: train("--out", "/dev/null/run"), "/dev/null"),
    ("out-in-proc", lambda r, t: train("--out", "/proc/probvq-run"), "/proc/probvq-run"),
    ("diagnose-out-existing", lambda r, t: ["diagnose", str(r / "a"), "--out", str(r / "b")], "--out"),
    # -- runs and checkpoints ---------------------------------------------------------------------
    ("evaluate-missing-run", lambda r, t: ["evaluate", str(t / "gone")], "gone"),
    ("evaluate-not-a-run", lambda r, t: ["evaluate", empty_dir(t)], "config.json"),
    (
        "evaluate-truncated-checkpoint",
        lambda r, t: ["evaluate", damaged(r, t, lambda p: truncate(p / "best.pt", 9000))],
        "best.pt",
    ),
    (
        "evaluate-tiny-checkpoint",
        lambda r, t: ["evaluate", damaged(r, t, lambda p: truncate(p / "best.pt", 100))],
        "best.pt",
    ),
    (
        "evaluate-flipped-byte",
        lambda r, t: ["evaluate", damaged(r, t, lambda p: flip_byte(p / "best.pt"))],
        "best.pt",
    ),
    ("evaluate-foreign-checkpoint", lambda r, t: ["evaluate", foreign_best(r, t)], "another run"),
    ("evaluate-edited-config", lambda r, t: ["evaluate", swapped_config(r, t)], "another config"),
    (
        "evaluate-corrupt-config",
        lambda r, t: ["evaluate", damaged(r, t, lambda p: (p / "config.json").write_text("{"))],
        "config.json",
    ),
    (
        "evaluate-missing-final",
        lambda r, t: [
            "evaluate",
            damaged(r, t, lambda p: (p / "final.pt").unlink()),
            "--checkpoint",
            "final",
        ],
        "final.pt",
    ),
    ("diagnose-torn-log", lambda r, t: ["diagnose", torn_log(r, t), "--out", str(t / "d")], "metrics"),
    (
        "evaluate-subset-too-large",
        lambda r, t: ["evaluate", str(r / "a"), "--subset", "5000"],
        "--subset",
    ),
    ("evaluate-subset-zero", lambda r, t: ["evaluate", str(r / "a"), "--subset", "0"], "--subset"),
    (
        "evaluate-limit-and-subset",
        lambda r, t: ["evaluate", str(r / "a"), "--limit", "3", "--subset", "3"],
        "--limit",
    ),
    ("diagnose-k-zero", lambda r, t: ["diagnose", str(r / "a"), "--k", "0", "--out", str(t / "d")], "k"),
    ("resume-not-a-run", lambda r, t: ["train", "--resume", empty_dir(t)], "config.json"),
    ("resume-with-settings", lambda r, t: ["train", "--resume", str(r / "a"), "--lr", "0.1"], "--lr"),
    ("resume-finished", lambda r, t: ["train", "--resume", str(r / "a")], "already finished"),
    (
        "resume-all-checkpoints-corrupt",
        lambda r, t: [
            "train",
            "--resume",
            damaged(r, t, lambda p: [(p / "final.pt").unlink(), truncate(p / "last.pt", 50)]),
        ],
        "no usable checkpoint",
    ),
]


@pytest.mark.parametrize(("case", "argv", "culprit"), CASES, ids=[case for case, _, _ in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(
    runs, tmp_path, capsys, case, argv, culprit
):
    args = argv(runs, tmp_path)
    if args[0] != "train":
        args = [*args, "--quiet"]
    before = snapshot(runs, tmp_path)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probvq: error:"), err
    assert len(err.splitlines()) == 1, err
    assert culprit in err, err
    assert snapshot(runs, tmp_path) == before


def test_suspicious_but_legal_settings_warn(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--eval-every", "100", "--valid-size", "5000"]) == 0
    err = capsys.readouterr().err
    assert "--eval-every 100 exceeds the run's 4 steps" in err
    assert "--valid-size 5000" in err


def test_checkpoints_name_their_run_and_image_shape(runs):
    state = torch.load(runs / "a" / "best.pt", weights_only=True)
    assert state["run_id"] == json.loads((runs / "a" / "run.json").read_text())["run_id"]
    assert state["image_shape"] == [1, 28, 28]
