"""What every benchmark records beside its figures, and how it writes them."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyro
import torch


def environment() -> dict[str, Any]:
    """Versions and machine, so figures can be compared across runs."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` plus :func:`environment` as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "environment": environment()}, indent=2) + "\n")
    return path


def peak_rss_mib() -> float:
    """This process's peak resident size so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, args: list[str]) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a fresh Python process; its last stdout line, as JSON.

    A fresh process per measurement keeps each peak resident size its own.
    """
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
