"""Peak memory of a computation, and how many rows fit under a cap.

Importance-weighted bounds run ``points x draws`` rows through the model; the rows per forward
pass are what a memory cap limits. The data encoders run once per point
(:func:`probvq.repeats.once_per_point`), the rest once per row, so the memory of a no-grad pass
grows linearly with both. Three small probe passes, ``(points, draws) = (1, p), (1, 2p), (p, 1)``,
give the fixed cost ``a``, the per-row cost ``b`` and the per-point cost ``e``::

    peak(points, draws) ~= a + b rows + e points,        rows = points x draws

A pass of at most ``R`` rows with ``k`` draws per point holds ``max(1, R / k)`` points or fewer, so
``peak <= a + e + (b + e / k) R`` and the cap gives the largest batch of rows::

    rows = floor((cap - a - e) / (b + e / k))

Peaks are measured the same way on every device: on CUDA from the allocator's own peak counter; on
the CPU by counting every tensor storage created inside the block while it lives (a dispatch mode
sees each operator's outputs; workspace an operator frees before returning is not seen).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RowCost:
    """Peak bytes of a pass: ``fixed + per_row * rows + per_point * points``."""

    fixed: float
    per_row: float
    per_point: float

    def rows_within(self, cap_bytes: float, k: int) -> int:
        """The most rows per pass with ``k`` draws per point whose peak stays under ``cap_bytes``.

        Raises ``ValueError`` when even one row would not fit.
        """
        if not (math.isfinite(cap_bytes) and cap_bytes > 0):
            raise ValueError(f"memory cap: expected a positive finite size, got {cap_bytes!r} bytes")
        if k < 1:
            raise ValueError(f"k: expected a positive number of draws per point, got {k!r}")
        room = cap_bytes - self.fixed - self.per_point
        rows = int(room // (self.per_row + self.per_point / k)) if room > 0 else 0
        if rows < 1:
            raise ValueError(
                f"memory cap: {cap_bytes / MIB:.2f} MiB is too small; one row needs about "
                f"{(self.fixed + self.per_point + self.per_row) / MIB:.2f} MiB"
            )
        return rows


def row_cost(run: Callable[[int, int], object], device: torch.device | str, probe: int = 4) -> RowCost:
    """Fit the :class:`RowCost` of ``run(points, draws)``, a pass of ``points x draws`` rows.

    ``run`` is measured at ``(1, probe)``, ``(1, 2 * probe)`` and ``(probe, 1)``.
    """
    if probe < 2:
        raise ValueError(f"probe: expected at least 2 rows, got {probe!r}")
    peaks = []
    for points, draws in ((1, probe), (1, 2 * probe), (probe, 1)):
        with PeakMemory(device) as peak:
            run(points, draws)
        peaks.append(peak.bytes)
    per_row = max((peaks[1] - peaks[0]) / probe, 1.0)
    per_point = max((peaks[2] - peaks[0]) / (probe - 1), 0.0)
    fixed = max(peaks[0] - per_row * probe - per_point, 0.0)
    return RowCost(fixed, per_row, per_point)
