"""Resume: a run killed at any point and resumed ends bitwise where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from probvq.cli import main
from probvq.inference import load_checkpoint
from probvq.inference.training import train
from probvq.inference.training.checkpoint import RunDir

RUN = [
    "--quiet", "--max-steps", "14", "--eval-every", "4", "--checkpoint-every", "5", "--hidden", "8",
    "--res-blocks", "0", "--num-codes", "8", "--code-dim", "4", "--train-limit", "200",
    "--valid-size", "40", "--batch-size", "32", "--restart-threshold", "0.5",
]  # fmt: skip

# Runs the CLI in a child process that SIGKILLs itself: after the step-th optimiser step, or while
# renaming the step-th checkpoint into place (last.pt already moved to previous.pt).
KILLER = """
import os, signal, sys
from probvq.inference.training import checkpoint, train
where, at = sys.argv[1], int(sys.argv[2])
count = 0
if where == "step":
    hook = train.after_step
    def after_step(*modules):
        global count
        hook(*modules)
        count += 1
        if count == at:
            os.kill(os.getpid(), signal.SIGKILL)
    train.after_step = after_step
else:
    replace = checkpoint.os.replace
    def renaming(src, dst):
        global count
        if str(dst).endswith("last.pt"):
            count += 1
            if count == at:
                os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
    checkpoint.os.replace = renaming
from probvq.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _tensors(state):
    if isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from ((f"{key}.{name}", t) for name, t in _tensors(state[key]))
    elif isinstance(state, list | tuple):
        for i, item in enumerate(state):
            yield from ((f"{i}.{name}", t) for name, t in _tensors(item))
    elif isinstance(state, torch.Tensor):
        yield "", state


def _same(a, b):
    """Bitwise equal, NaN matching NaN (e.g. a normaliser never estimated)."""
    if torch.equal(a, b):
        return True
    return (
        a.is_floating_point() and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
    )


def assert_bitwise_equal(a, b):
    for part in ("model", "family", "optimizer"):
        left, right = dict(_tensors(a[part])), dict(_tensors(b[part]))
        assert left.keys() == right.keys()
        unequal = [name for name in left if not _same(left[name], right[name])]
        assert not unequal, f"{part}: {unequal[:5]}"


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per family."""
    runs = {}
    for family in ("sq", "rr"):
        out = tmp_path_factory.mktemp("reference") / family
        assert main(["train", "--family", family, "--out", str(out), *RUN]) == 0
        runs[family] = out
    return runs


@pytest.mark.parametrize(
    ("family", "where", "at"),
    [
        ("sq", "step", 3),  # before the first checkpoint: only config.json
        ("sq", "step", 7),  # between checkpoints, after an evaluation
        ("sq", "rename", 2),  # while renaming the step-10 checkpoint: falls back to previous.pt
        ("rr", "step", 12),  # a temperature schedule part-way, three evaluations logged
    ],
)
def test_a_killed_run_resumes_to_the_bitwise_same_parameters(reference, tmp_path, family, where, at):
    out = tmp_path / "run"
    args = ["train", "--family", family, "--out", str(out), *RUN]
    killed = subprocess.run([sys.executable, "-c", KILLER, where, str(at), *args], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert not (out / "final.pt").exists()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not list(out.glob(".*.tmp")), "stale temporary files were left behind"
    expected = load_checkpoint(reference[family] / "final.pt")
    resumed = load_checkpoint(out / "final.pt")
    assert_bitwise_equal(resumed, expected)
    assert resumed["step"] == expected["step"] == 14
    assert _without_time(RunDir(out).read_log()) == _without_time(RunDir(reference[family]).read_log())


def test_ctrl_c_saves_a_checkpoint_and_exits_with_one_line(reference, tmp_path, monkeypatch, capsys):
    hook, count = train.after_step, [0]

    def interrupting(*modules):
        hook(*modules)
        count[0] += 1
        if count[0] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "after_step", interrupting)
    out = tmp_path / "run"
    assert main(["train", "--family", "sq", "--out", str(out), *RUN]) == 130
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "at step 6" in message and "--resume" in message
    assert load_checkpoint(out / "last.pt")["step"] == 6
    monkeypatch.setattr(train, "after_step", hook)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert_bitwise_equal(
        load_checkpoint(out / "final.pt"), load_checkpoint(reference["sq"] / "final.pt")
    )


def test_a_corrupted_last_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--family", "sq", "--out", str(out), *RUN[:2], *RUN[4:], "--max-steps", "11"])
        == 0
    )
    # Pretend the run was cut short at step 10 and its last checkpoint damaged on disk.
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 11 and load_checkpoint(out / "previous.pt")["step"] == 10
    data = bytearray((out / "last.pt").read_bytes())
    (out / "last.pt").write_bytes(bytes(data[: len(data) // 2]))
    (out / "final.pt").unlink()
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == 11
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "last.pt is corrupted" in err and "resuming from the checkpoint before it" in err
    assert load_checkpoint(out / "final.pt")["step"] == 11


def test_resume_refuses_settings_and_a_finished_run(reference, capsys):
    assert main(["train", "--resume", str(reference["sq"]), "--lr", "0.1"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(reference["sq"])]) == 2
    assert "already finished" in capsys.readouterr().err
