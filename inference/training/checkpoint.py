"""Run directories and checkpoints.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per evaluation, appended
a line at a time), ``best.pt`` and ``final.pt`` (checkpoints) and ``summary.json``. Config, summary
and checkpoints are written to a temporary name and renamed into place, so an interrupted run never
leaves one half-written, and a run refuses a directory that already holds files. Checkpoints hold
only tensors and plain Python values, load with ``torch.load(..., weights_only=True)`` onto the
CPU, and carry a SHA-256 digest of their contents that loading verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

FORMAT = "probvq-checkpoint-1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _into_place(tmp: Path, path: Path, mode: int) -> Iterator[Path]:
    """Yield ``tmp``; if the block succeeds, give it the usual permissions and rename it to ``path``."""
    try:
        yield tmp
        os.chmod(tmp, mode & ~_umask())  # mkstemp makes 0600 files, mkdtemp 0700 directories
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def replacing(path: str | Path) -> AbstractContextManager[Path]:
    """A temporary file beside ``path`` that replaces ``path`` only when the block succeeds."""
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    return _into_place(Path(name), path, 0o666)


def new_directory(path: str | Path) -> AbstractContextManager[Path]:
    """A temporary directory that becomes ``path`` (absent or empty) only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return _into_place(Path(tmp), path, 0o777)


def _atomic_write(path: Path, write) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, value: Any) -> None:
    """Write JSON atomically."""
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def digest(value: Any) -> str:
    """SHA-256 over a nest of dicts, lists, tensors and plain values (keys in sorted order)."""
    hasher = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, dict):
            for key in sorted(item, key=repr):
                hasher.update(repr(key).encode())
                feed(item[key])
        elif isinstance(item, list | tuple):
            hasher.update(f"[{len(item)}".encode())
            for element in item:
                feed(element)
        elif isinstance(item, torch.Tensor):
            tensor = item.detach().cpu()
            hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            hasher.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        else:
            hasher.update(repr(item).encode())

    feed(value)
    return hasher.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save a checkpoint (a dict of state dicts and plain values) atomically, with its digest."""
    payload = {"format": FORMAT, **state}
    payload["digest"] = digest(payload)
    _atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely onto the CPU; clear errors for missing, bad or altered files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        # torch's message advises weights_only=False; keep only its first line.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint: {path} is corrupted or not a checkpoint ({reason})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a probvq checkpoint ({FORMAT})")
    stored = state.pop("digest", None)
    if stored != digest(state):
        raise ValueError(f"checkpoint: {path} is corrupted (its contents do not match its digest)")
    return state


class RunDir:
    """The directory of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @staticmethod
    def check_new(path: str | Path) -> None:
        """Refuse a path that already holds files (so no earlier run is ever overwritten)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"--out: {path} already exists and is not empty; choose a new directory")

    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any]) -> RunDir:
        """Make a new run directory; refuse one that already holds files."""
        cls.check_new(path)
        path = Path(path)
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
        """The logged records; a last line torn by an interrupted run is left out."""
        path = self.path / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number < len(lines):
                    raise ValueError(f"{path}: line {number} is not JSON ({err})") from err
        return records
