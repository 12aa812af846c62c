"""Run directories and checkpoints.

A run directory holds ``config.json`` and ``run.json`` (the run's identity), ``metrics.jsonl`` (one
JSON object per evaluation) and ``faults.jsonl`` (one per skipped step), appended a line at a time,
the checkpoints ``last.pt`` (every ``checkpoint_every`` steps; the one before it is kept as
``previous.pt``), ``best.pt`` (best exact ELBO) and ``final.pt``, and ``summary.json``.

Every file but the logs is written to a temporary name, synced and renamed into place, so a killed
run never leaves one half-written; the directory itself appears only once its first files are
complete, and a new run refuses a directory that already holds files. A file-system failure is a
:class:`WriteError` naming the path. Checkpoints hold only tensors and plain Python values, load
with ``torch.load(..., weights_only=True)`` onto the CPU, carry a SHA-256 digest of their contents
that loading verifies, and name the run they belong to (``run_id``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

FORMAT = "probvq-checkpoint-2"


class WriteError(OSError):
    """A file-system failure while writing ``filename`` (full disk, unwritable or missing path)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Report any ``OSError`` of the block as a :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(err.errno, err.strerror or str(err), str(path)) from err


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
    with writing(path):
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    return _into_place(Path(name), path, 0o666)


def new_directory(path: str | Path) -> AbstractContextManager[Path]:
    """A temporary directory that becomes ``path`` (absent or empty) only when the block succeeds.

    Parents that did not exist are removed again if the block fails.
    """
    path = Path(path)
    missing = [p for p in reversed(path.parents) if not p.exists()]
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError:
            _remove_empty(missing)
            raise
    return _cleaning(_into_place(Path(tmp), path, 0o777), missing)


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return


@contextmanager
def _cleaning(block: AbstractContextManager[Path], created: list[Path]) -> Iterator[Path]:
    try:
        with block as tmp:
            yield tmp
    except BaseException:
        _remove_empty(created)
        raise


def _atomic_write(path: Path, write) -> None:
    with writing(path), replacing(path) as tmp, open(tmp, "wb") as f:
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
    except (
        RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError
    ) as err:  # fmt: skip
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
    """The directory of one training run (see the module for its files)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.created_parents: list[Path] = []

    @staticmethod
    def check_new(path: str | Path, flag: str = "--out") -> None:
        """Refuse a path that holds files or cannot be created, naming ``flag``; writes nothing."""
        if not str(path).strip():
            raise ValueError(f"{flag}: expected a directory path, got an empty string")
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{flag}: {path} already exists and is not empty; choose a new directory")
        ancestor = next(p for p in path.absolute().parents if p.exists())
        if not ancestor.is_dir():
            raise ValueError(f"{flag}: cannot create {path}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"{flag}: cannot create {path}: {ancestor} is not writable")

    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any]) -> RunDir:
        """Make a new run directory holding ``config.json`` and ``run.json``, or nothing at all."""
        cls.check_new(path)
        run = cls(path)
        run.created_parents = [p for p in reversed(run.path.absolute().parents) if not p.exists()]
        with new_directory(path) as tmp:
            write_json(tmp / "config.json", config)
            write_json(tmp / "run.json", {"run_id": uuid.uuid4().hex})
        return run

    def discard(self) -> None:
        """Remove a new run that holds nothing to resume, with the parents its creation made."""
        shutil.rmtree(self.path, ignore_errors=True)
        _remove_empty(self.created_parents)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        for name in ("config.json", "run.json"):
            if not (run.path / name).is_file():
                raise FileNotFoundError(f"run_dir: {run.path} holds no {name} (not a probvq run)")
        return run

    def _json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"run_dir: {self.path}/{name} is not valid JSON: {err}") from err

    def config(self) -> dict[str, Any]:
        return self._json("config.json")

    @property
    def run_id(self) -> str:
        identity = self._json("run.json")
        if not isinstance(identity, dict) or not isinstance(identity.get("run_id"), str):
            raise ValueError(f"run_dir: {self.path}/run.json does not name a run_id")
        return identity["run_id"]

    def checkpoint(self, name: str) -> Path:
        return self.path / f"{name}.pt"

    def save(self, name: str, state: dict[str, Any]) -> None:
        """Save checkpoint ``name``; ``last`` first moves the current one to ``previous``."""
        if name == "last" and self.checkpoint("last").exists():
            with writing(self.checkpoint("previous")):
                os.replace(self.checkpoint("last"), self.checkpoint("previous"))
        save_checkpoint(self.checkpoint(name), state)

    def latest(self) -> tuple[dict[str, Any] | None, list[str]]:
        """The newest loadable of ``last.pt`` and ``previous.pt`` and what was wrong with the others.

        ``None`` when the run never reached its first checkpoint; a ``ValueError`` naming both
        files when checkpoints exist but none loads.
        """
        problems = []
        for name in ("last", "previous"):
            if not self.checkpoint(name).exists():
                continue
            try:
                state = load_checkpoint(self.checkpoint(name))
            except ValueError as err:
                problems.append(str(err))
                continue
            self.check_owns(state, self.checkpoint(name))
            return state, problems
        if problems:
            raise ValueError(f"--resume: no usable checkpoint in {self.path}: {'; '.join(problems)}")
        return None, problems

    def check_owns(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint written by another run, or under another config."""
        if state.get("run_id") != self.run_id:
            raise ValueError(
                f"checkpoint: {path} belongs to run {state.get('run_id')}, not to the run in "
                f"{self.path} ({self.run_id}); it was copied from another run directory"
            )
        if state.get("config") != self.config():
            raise ValueError(f"checkpoint: {path} was written under another config than {self.path}")

    def clear_temporaries(self) -> None:
        """Remove the temporary files of writes a killed run never renamed into place."""
        for path in self.path.glob(".*.tmp"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def log(self, record: dict[str, Any], name: str = "metrics") -> None:
        """Append one JSON line to ``<name>.jsonl``."""
        path = self.path / f"{name}.jsonl"
        with writing(path), open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def rewrite_log(self, records: list[dict[str, Any]], name: str = "metrics") -> None:
        """Replace ``<name>.jsonl`` by ``records`` (a resumed run drops what followed its checkpoint)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        _atomic_write(self.path / f"{name}.jsonl", lambda f: f.write(text.encode()))

    def read_log(self, name: str = "metrics") -> list[dict[str, Any]]:
        """The logged records; a last line torn by an interrupted run is left out."""
        path = self.path / f"{name}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number < len(lines):
                    raise ValueError(f"{path}: line {number} is not JSON ({err})") from err
        return records
