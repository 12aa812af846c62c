"""Importance-weighted bounds (Burda et al. 2016, IWAE) from any model/guide pair.

With ``z_1 .. z_k`` drawn from the guide and ``w_i = p(x, z_i) / q(z_i | x)``::

    IWAE_k(x) = log (1/k) sum_i w_i,      E[IWAE_1] = ELBO <= E[IWAE_k] <= E[IWAE_k'] <= log p(x)

for ``k <= k'``, and ``IWAE_k -> log p(x)`` as ``k`` grows whenever q covers the posterior's support.
For discrete codes the guide must report the exact ``log q`` of the code it drew (probvq families
do so under ``family.exact()``); a guide with a point mass (hard VQ) has ``w`` constant, so its
bound never tightens: importance sampling cannot see mass outside q's support.

The ``k`` draws of a point are rows of one batch: each point is repeated, so nothing is asked of a
model beyond a batch dimension. Rows per pass are limited (see :mod:`..diagnostics.memory`); points
with fewer samples than that share a pass, and a point with more is split over several. The model's
data encoders (:func:`probvq.repeats.data_encoders`) run once per point of a pass, not once per row
(:func:`probvq.repeats.once_per_point`): only the per-draw work scales with ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from probvq.repeats import once_per_point

from .terms import log_weight, run_traces


def sample_log_weights(model: Callable, guide: Callable, x: Tensor) -> Tensor:
    """One importance log-weight per row of ``x`` (one guide draw each)."""
    return log_weight(*run_traces(model, guide, x))


def log_weights(
    model: Callable,
    guide: Callable,
    x: Tensor,
    k: int,
    rows: int,
    encoders: Sequence[nn.Module] = (),
) -> Iterator[Tensor]:
    """Yield the log-weights ``(points, k)`` of consecutive groups of points of ``x``.

    Each pass through the model holds at most ``rows`` rows (points times samples); ``encoders``
    (in eval mode) run on the pass's points only.
    """
    if k < 1:
        raise ValueError(f"k: expected a positive number of samples, got {k!r}")
    if rows < 1:
        raise ValueError(f"rows: expected a positive number of rows per pass, got {rows!r}")
    points = max(1, rows // k)
    per_pass = min(k, rows // points)
    for start in range(0, x.shape[0], points):
        group = x[start : start + points]
        chunks = []
        for done in range(0, k, per_pass):
            draws = min(per_pass, k - done)
            repeated = group.repeat_interleave(draws, dim=0)
            with once_per_point(encoders, draws):
                log_w = sample_log_weights(model, guide, repeated)
            chunks.append(log_w.view(len(group), draws))
        yield torch.cat(chunks, dim=1)


def iwae_bound(log_w: Tensor) -> Tensor:
    """``log (1/k) sum_i exp(log_w_i)`` along the last dimension, in float64."""
    log_w = log_w.double()
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


def curve_sizes(k: int) -> list[int]:
    """The sample sizes of a convergence curve: 1, 10, 100, ... below ``k``, then ``k``."""
    sizes = [10**p for p in range(int(math.log10(k)) + 1) if 10**p < k]
    return [*sizes, k]
