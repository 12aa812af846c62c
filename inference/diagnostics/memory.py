"""Peak memory of a computation, and how many rows fit under a cap.

Importance-weighted bounds run ``points x samples`` rows through the model; the rows per forward
pass are what a memory cap limits. The memory of a no-grad pass grows linearly with its rows, so two
small probe passes give its slope and intercept, and the cap gives the largest batch of rows::

    peak(r) ~= a + b r    =>    rows = floor((cap - a) / b)

Peaks are measured the same way on every device: on CUDA from the allocator's own peak counter; on
the CPU by counting every tensor storage created inside the block while it lives (a dispatch mode
sees each operator's outputs; workspace an operator frees before returning is not seen).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import TracebackType

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 2**20


def _tensors(tree: object) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class _StorageCounter(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive; their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        # Views and in-place results share an input's storage: made before the block, or counted.
        inputs = {leaf.untyped_storage()._cdata for leaf in _tensors((args, kwargs))}
        for leaf in _tensors(out):
            storage = leaf.untyped_storage()
            if storage._cdata not in self.live and storage._cdata not in inputs:
                self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``: the block's peak allocation."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes = 0
        self._counter: _StorageCounter | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._counter = _StorageCounter().__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            assert self._counter is not None
            self._counter.__exit__(kind, error, traceback)
            self.bytes = self._counter.peak


def rows_within(
    cap_bytes: float, run: Callable[[int], object], device: torch.device | str, probe: int = 4
) -> int:
    """The most rows one ``run(rows)`` may take so that its peak memory stays under ``cap_bytes``.

    ``run`` is measured at ``probe`` and ``2 * probe`` rows; the linear fit through the two peaks is
    solved for the cap. Raises ``ValueError`` when even one row would not fit.
    """
    if not (math.isfinite(cap_bytes) and cap_bytes > 0):
        raise ValueError(f"memory cap: expected a positive finite size, got {cap_bytes!r} bytes")
    peaks = []
    for rows in (probe, 2 * probe):
        with PeakMemory(device) as peak:
            run(rows)
        peaks.append(peak.bytes)
    slope = max((peaks[1] - peaks[0]) / probe, 1.0)
    intercept = max(peaks[0] - slope * probe, 0.0)
    rows = int((cap_bytes - intercept) // slope)
    if rows < 1:
        raise ValueError(
            f"memory cap: {cap_bytes / MIB:.2f} MiB is too small; one row needs about "
            f"{(intercept + slope) / MIB:.2f} MiB"
        )
    return rows
