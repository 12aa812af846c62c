"""The codebook: a K x D table of embeddings and the utilities every guide family shares.

Distances use the matmul identity ``||z - e_k||^2 = ||z||^2 - 2 z.e_k + ||e_k||^2`` and are
computed in chunks over K, so the temporaries stay within a fixed element budget however large the
codebook is (``nearest`` never holds the full N x K matrix at all).

Training statistics are *observed* during a step and *committed* after the optimiser step, so the
table never changes under an autograd graph that still needs it:

* usage: an exponential moving average of assignments per code, for dead-code restarts (families
  record statistics only when restarts or EMA updates will use them);
* EMA codebook (van den Oord et al. 2017, appendix; Razavi et al. 2019):
  ``N_k <- g N_k + (1 - g) n_k``, ``m_k <- g m_k + (1 - g) sum_{i: k_i = k} zhat_i``,
  with Laplace-smoothed counts ``N_k <- (N_k + eps) / (N + K eps) * N`` and ``e_k = m_k / N_k``;
* dead-code restart: codes whose usage falls below a threshold are moved onto encoder outputs
  (Dhariwal et al. 2020, Jukebox).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributions import constraints

from probvq import distributed
from probvq.spaces import CodeSpace

INITIALISERS = ("normal", "uniform", "data", "kmeans")

_EXACT_INTEGERS = {torch.float16: 2**11, torch.bfloat16: 2**8, torch.float32: 2**24}
"""Up to which count each float type holds every integer (the index channel of a code)."""


class _Codes(constraints.Constraint):
    """Codes of a codebook: ``(..., D + 1)``, the embedding and an integral index in ``[0, K)``."""

    event_dim = 1

    def __init__(self, num_codes: int) -> None:
        super().__init__()
        self.num_codes = num_codes

    def check(self, value: Tensor) -> Tensor:
        index = value[..., -1]
        return (index == index.round()) & (index >= 0) & (index < self.num_codes)


class Codebook(CodeSpace):
    """K learnable embeddings of dimension D.

    A code site over a codebook holds codes ``(..., D + 1)``: the value a program reads (an
    embedding, or a relaxed mixture of embeddings) and, in the last channel, the index of the code
    it stands for (see :mod:`probvq.spaces`).

    Args:
        num_codes: K >= 2.
        dim: D >= 1.
        init: ``"normal"`` / ``"uniform"`` (random, at construction) or ``"data"`` / ``"kmeans"``
            (from the first batch of encoder outputs a family sees in training).
        restart_threshold: codes whose usage EMA drops below this many assignments per step are
            restarted from encoder outputs; 0 disables restarts.
        usage_decay: decay of the usage EMA.
        chunk_elements: element budget of one chunk of the N x K distance computation.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        init: str = "kmeans",
        restart_threshold: float = 0.0,
        usage_decay: float = 0.99,
        chunk_elements: int = 2**24,
    ) -> None:
        super().__init__()
        if int(num_codes) != num_codes or num_codes < 2:
            raise ValueError(f"num_codes: a codebook needs K >= 2 codes, got {num_codes!r}")
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim: the code dimension D must be a positive integer, got {dim!r}")
        if init not in INITIALISERS:
            raise ValueError(f"init: expected one of {INITIALISERS}, got {init!r}")
        if restart_threshold < 0:
            raise ValueError(f"restart_threshold: must be >= 0, got {restart_threshold!r}")
        if not 0.0 < usage_decay < 1.0:
            raise ValueError(f"usage_decay: must lie in (0, 1), got {usage_decay!r}")
        self.num_codes = int(num_codes)
        self.dim = int(dim)
        self.value_shape = torch.Size([self.dim])
        self.code_shape = torch.Size([self.dim + 1])
        self.support = _Codes(self.num_codes)
        self.init = init
        self.restart_threshold = float(restart_threshold)
        self.usage_decay = float(usage_decay)
        self.chunk_elements = int(chunk_elements)
        weight = torch.randn(self.num_codes, self.dim)
        if init == "uniform":
            weight.uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
        self.weight = nn.Parameter(weight)
        self.register_buffer("initialised", torch.tensor(init in ("normal", "uniform")))
        self.register_buffer("usage", torch.ones(self.num_codes))
        # EMA statistics start as one pseudo-assignment at each code's own embedding, so a code
        # that receives no data keeps its place instead of collapsing to the origin.
        self.register_buffer("ema_count", torch.ones(self.num_codes))
        self.register_buffer("ema_sum", weight.clone())
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    def __getstate__(self) -> dict:
        # The pending statistics belong to an unfinished step, not to the codebook's state.
        state = self.__dict__.copy()
        state["_pending"] = None
        return state

    def extra_repr(self) -> str:
        return f"K={self.num_codes}, D={self.dim}, init={self.init!r}"

    # -- distances -------------------------------------------------------------------------

    def _chunks(self, rows: int) -> Iterator[slice]:
        step = max(1, self.chunk_elements // max(rows, 1))
        for start in range(0, self.num_codes, step):
            yield slice(start, min(start + step, self.num_codes))

    def _flat(self, z: Tensor, name: str) -> Tensor:
        """``z`` as rows ``(N, D)`` in the codebook's dtype."""
        if z.shape[-1:] != self.value_shape:
            raise ValueError(f"{name}: expected trailing dimension D={self.dim}, got {tuple(z.shape)}")
        return z.reshape(-1, self.dim).to(self.weight.dtype)

    def distances(self, z: Tensor) -> Tensor:
        """Squared distances ``||z - e_k||^2`` of shape ``(..., K)`` (differentiable).

        Computed in the codebook's dtype even under autocast: in bfloat16 the expansion's
        cancellation would misrank near codes and blur the softmaxes built on these distances.
        """
        flat = self._flat(z, "z")
        with torch.autocast(flat.device.type, enabled=False):
            z2 = flat.pow(2).sum(-1, keepdim=True)
            parts = [
                torch.addmm(self.weight[c].pow(2).sum(-1), flat, self.weight[c].T, alpha=-2.0) + z2
                for c in self._chunks(flat.shape[0])
            ]
        return torch.cat(parts, dim=-1).clamp_min(0.0).reshape(*z.shape[:-1], self.num_codes)

    @torch.no_grad()
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def nearest(self, z: Tensor) -> Tensor:
        """Index of the nearest code, ``argmin_k ||z - e_k||^2``, without the full N x K matrix."""
        flat = self._flat(z, "z")
        best = torch.full((flat.shape[0],), math.inf, dtype=flat.dtype, device=flat.device)
        index = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        for c in self._chunks(flat.shape[0]):
            codes = self.weight[c]
            # No name holds the chunk, so it is freed before the next one is allocated.
            value, arg = torch.addmm(codes.pow(2).sum(-1), flat, codes.T, alpha=-2.0).min(-1)
            better = value < best
            best = torch.where(better, value, best)
            index = torch.where(better, arg + c.start, index)
        return index.reshape(z.shape[:-1])

    # -- the CodeSpace maps ----------------------------------------------------------------

    @property
    def like(self) -> Tensor:
        return self.weight

    def embed(self, weights: Tensor) -> Tensor:
        # In the codebook's dtype under autocast too: the code built from it carries the index.
        with torch.autocast(weights.device.type, enabled=False):
            return weights.to(self.weight.dtype) @ self.weight

    def embed_index(self, index: Tensor) -> Tensor:
        return nn.functional.embedding(index, self.weight)

    def to_code(self, value: Tensor, index: Tensor) -> Tensor:
        if self.num_codes > _EXACT_INTEGERS.get(value.dtype, 2**53):
            raise ValueError(
                f"dtype: {value.dtype} cannot hold code indices up to K={self.num_codes} exactly"
            )
        return torch.cat([value, index.detach().unsqueeze(-1).to(value.dtype)], -1)

    def value_of(self, code: Tensor) -> Tensor:
        return code[..., : self.dim]

    def index_of(self, code: Tensor) -> Tensor:
        return code[..., self.dim].detach().long()

    # -- initialisation --------------------------------------------------------------------

    @torch.no_grad()
    def initialise(self, features: Tensor, iterations: int = 10) -> None:
        """Data-based initialisation from a batch of encoder outputs ``(..., D)``.

        ``"data"`` copies random feature vectors; ``"kmeans"`` seeds with k-means++ (Arthur and
        Vassilvitskii 2007) and runs Lloyd iterations.
        """
        flat = distributed.gather_rows(self._flat(features.detach(), "features").to(self.weight.dtype))
        if flat.shape[0] == 0:
            raise ValueError("features: cannot initialise a codebook from an empty batch")
        if self.init == "kmeans":
            centres = _kmeans_plus_plus(flat, self.num_codes)
        else:
            replace = flat.shape[0] < self.num_codes
            ones = torch.ones(flat.shape[0], device=flat.device)
            centres = flat[torch.multinomial(ones, self.num_codes, replacement=replace)].clone()
        if flat.shape[0] < self.num_codes:
            centres += 1e-3 * flat.std() * torch.randn_like(centres)
        if self.init == "kmeans":
            for _ in range(iterations):
                self.weight.copy_(centres)
                index = self.nearest(flat)
                counts = torch.bincount(index, minlength=self.num_codes).to(flat.dtype)
                sums = torch.zeros_like(centres).index_add_(0, index, flat)
                filled = counts > 0
                centres[filled] = sums[filled] / counts[filled, None]
        self.weight.copy_(centres)
        distributed.broadcast_(self.weight)
        self.ema_count.fill_(1.0)
        self.ema_sum.copy_(self.weight)
        self.initialised.fill_(True)

    # -- training statistics ---------------------------------------------------------------

    @torch.no_grad()
    def observe(self, features: Tensor, index: Tensor) -> None:
        """Record one step's assignments; :meth:`commit` applies them after the optimiser step."""
        flat = features.detach().reshape(-1, self.dim).to(self.weight.dtype)
        index = index.reshape(-1)
        counts = torch.bincount(index, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros_like(self.weight).index_add_(0, index, flat)
        if self._pending is not None:
            counts = counts + self._pending[0]
            sums = sums + self._pending[1]
            flat = torch.cat([self._pending[2], flat])[-4 * self.num_codes :]
        self._pending = (counts, sums, flat)

    def discard_step(self) -> None:
        """Forget the statistics of a step the optimiser skipped (a non-finite loss or gradient)."""
        self._pending = None

    @torch.no_grad()
    def commit(self, ema_decay: float | None = None, epsilon: float = 1e-5) -> None:
        """Apply the observed statistics: usage EMA, optional EMA codebook, dead-code restarts.

        Under data-parallel training the counts and sums are summed over ranks first, so every
        rank applies the statistics of the global batch (:mod:`probvq.distributed`).
        """
        if self._pending is None:
            return
        counts, sums, features = self._pending
        self._pending = None
        distributed.all_reduce_sum(counts)
        distributed.all_reduce_sum(sums)
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)
        if ema_decay is not None:
            self.ema_count.mul_(ema_decay).add_(counts, alpha=1.0 - ema_decay)
            self.ema_sum.mul_(ema_decay).add_(sums, alpha=1.0 - ema_decay)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + epsilon) / (total + self.num_codes * epsilon) * total
            self.weight.copy_(self.ema_sum / smoothed[:, None])
        if self.restart_threshold > 0:
            self._restart(self.usage < self.restart_threshold, distributed.gather_rows(features))

    def _restart(self, dead: Tensor, features: Tensor) -> None:
        n_dead = int(dead.sum())
        if n_dead == 0 or features.shape[0] == 0:
            return
        pick = torch.randint(features.shape[0], (n_dead,), device=features.device)
        self.weight[dead] = features[pick]
        self.usage[dead] = self.restart_threshold
        self.ema_count[dead] = 1.0
        self.ema_sum[dead] = features[pick]
        distributed.broadcast_(self.weight, self.ema_sum)


def _kmeans_plus_plus(points: Tensor, k: int) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    picks = [int(torch.randint(points.shape[0], ()))]
    nearest = (points - points[picks[0]]).pow(2).sum(-1)
    for _ in range(k - 1):
        total = nearest.sum()
        weights = nearest if total > 0 else torch.ones_like(nearest)
        picks.append(int(torch.multinomial(weights, 1)))
        nearest = torch.minimum(nearest, (points - points[picks[-1]]).pow(2).sum(-1))
    return points[picks].clone()


def perplexity(counts: Tensor) -> float:
    """``exp(H(usage))`` of a vector of code counts: the effective number of codes in use."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.double() / total
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))
