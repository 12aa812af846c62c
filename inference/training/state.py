"""What a run must save, beyond its modules and optimiser, to continue bit for bit.

A step's randomness comes from three places: the data order (its own generator), the guide's draws
(torch's global generator, on the CPU and on every CUDA device) and anything a model or hook draws
from Python's ``random`` or NumPy's global generator. :func:`rng_state` captures all of them as
tensors and plain values (so checkpoints still load with ``weights_only=True``);
:func:`set_rng_state` puts them back. :class:`DataOrder` is the data order itself: seeded epochs
of shuffled indices cut into global batches, with its position, so a resumed run reads exactly the
batches the uninterrupted one would have read.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def rng_state() -> dict[str, Any]:
    """The global random states of torch (CPU and CUDA), Python and NumPy."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))


class DataOrder:
    """Global batches of ``batch_size`` indices out of ``n``, reshuffled every epoch.

    An epoch is one ``randperm`` from a generator seeded by ``seed``; its last incomplete batch is
    dropped. :meth:`state_dict` holds the generator, the current permutation and the position in it.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size: expected 1 <= batch_size <= {n} examples, got {batch_size}")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.position = 0

    def next(self) -> Tensor:
        if self.position + self.batch_size > self.n:
            self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["order"].shape != (self.n,):
            raise ValueError(
                f"data: the checkpoint's data order covers {state['order'].numel()} training "
                f"examples, this data has {self.n}"
            )
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"])
