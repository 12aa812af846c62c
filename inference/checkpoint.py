"""Run directories and checkpoints.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per evaluation),
``best.pt`` and ``final.pt`` (checkpoints) and ``summary.json``. Every file is written to a temporary
name and renamed into place, so an interrupted run never leaves a half-written file, and a run
refuses a directory that already holds one. Checkpoints hold only tensors and plain Python values
and load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "probvq-checkpoint-1"


def _atomic_write(path: Path, write) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, value: Any) -> None:
    """Write JSON atomically."""
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save a checkpoint (a dict of state dicts and plain values) atomically."""
    _atomic_write(Path(path), lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); clear errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        # torch's message advises weights_only=False; keep only its first line.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint: {path} is corrupted or not a checkpoint ({reason})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a probvq checkpoint ({FORMAT})")
    return state


class RunDir:
    """The directory of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any]) -> RunDir:
        """Make a new run directory; refuse one that already holds files."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"--out: {path} already exists and is not empty; choose a new directory")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        write_json(run.path / "config.json", config)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not (run.path / "config.json").is_file():
            raise FileNotFoundError(f"run_dir: {run.path} holds no config.json (not a probvq run)")
        return run

    def config(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"run_dir: {self.path}/config.json is not valid JSON: {err}") from err

    def checkpoint(self, name: str) -> Path:
        return self.path / f"{name}.pt"

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl``."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
