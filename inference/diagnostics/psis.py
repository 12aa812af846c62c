"""Pareto k-hat of importance weights (Vehtari et al. 2024, PSIS; Yao et al. 2018).

For each data point, a generalised Pareto distribution is fitted to the largest importance weights
``w_i = p(x, z_i) / q(z_i | x)``; its shape ``k`` says how heavy their tail is. The estimate is
reliable for ``k < 0.5``, usable up to ``0.7``, and beyond ``0.7`` the importance-weighted bound
is dominated by a few draws and cannot be trusted (the guide misses posterior mass).

The fit is ArviZ's (:func:`arviz.psislw`), which smooths the right tail of whatever log-weights it
is given. Our log-weights are ``log p(x, z) - log q(z | x)`` and go in as they are; for PSIS-LOO
ArviZ is given ``-log p(y_i | theta)`` instead, the reciprocal ratio, and negating ours would flip
which tail is fitted.

Discrete codes give tied weights, which ArviZ reads as a failed fit (``k = inf``) when fewer than
five draws lie strictly above the tail's cutoff. When the whole tail is tied at the maximum (the
guide drew its largest weight more than ``M = ceil(min(S / 5, 3 sqrt(S)))`` times in ``S`` draws),
the weights are bounded with an atom at their maximum; the limit of the shape for such a tail is
``-inf``, which is what we report. Constant weights, as from a guide equal to the posterior, or from
hard VQ's point mass, are the extreme case. One to four distinct draws above a tie keep ArviZ's
``inf``: those few draws dominate the bound. Fewer than :data:`MIN_SAMPLES` draws leave no tail to
fit: ``nan``.
"""

from __future__ import annotations

import math
import warnings
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

MIN_SAMPLES = 21
"""ArviZ fits the largest ``ceil(min(S / 5, 3 sqrt(S)))`` draws and needs at least five."""

THRESHOLDS = (0.5, 0.7)


def load_arviz() -> ModuleType:
    """ArviZ, imported on first use (it is slow to import) without its announcement warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.2x announces its 1.x refactor
        import arviz

    return arviz


def _tail_size(samples: int) -> int:
    return math.ceil(min(samples / 5.0, 3 * math.sqrt(samples)))


def _tied_at_top(log_w: np.ndarray) -> np.ndarray:
    """Rows whose ``M + 1`` largest draws (ArviZ's tail and its cutoff) all equal the maximum.

    Equal up to float32 rounding of the log-weights, relative to their magnitude.
    """
    tolerance = 64 * np.finfo(np.float32).eps * np.maximum(1.0, np.abs(log_w).max(axis=-1))
    relative = log_w - log_w.max(axis=-1, keepdims=True)
    cutoff = np.sort(relative, axis=-1)[:, -(_tail_size(log_w.shape[-1]) + 1)]
    return cutoff >= -tolerance


def pareto_khat(log_weights: Tensor) -> Tensor:
    """Pareto k-hat per row of ``log_weights`` (points x samples): float64, shape ``(points,)``."""
    if log_weights.dim() != 2 or log_weights.shape[0] == 0:
        raise ValueError(
            f"log_weights: expected a (points, samples) matrix, got shape {tuple(log_weights.shape)}"
        )
    samples = log_weights.shape[1]
    if samples < MIN_SAMPLES:
        return torch.full((log_weights.shape[0],), math.nan, dtype=torch.float64)
    log_w = log_weights.detach().double().cpu().numpy()
    if not np.isfinite(log_w).all():
        raise ValueError("log_weights: expected finite log-weights (a draw scored -inf or NaN)")
    _, khat = load_arviz().psislw(log_w.copy(), reff=1.0)
    khat = np.where(_tied_at_top(log_w), -np.inf, khat)
    return torch.from_numpy(np.asarray(khat, dtype=np.float64))


def khat_summary(khat: Tensor) -> dict:
    """Shares above the thresholds among points with a k-hat, median and largest finite k-hat.

    Also counted: ``undefined`` points (too few draws), ``bounded`` ones (``-inf``) and
    ``unbounded`` ones (``+inf``: no tail could be fitted because one to four draws stand above
    all the rest, or the tail spans more than ~708 nats; either way a few draws dominate).
    """
    defined = khat[~torch.isnan(khat)]
    summary: dict = {
        "points": int(khat.numel()),
        "undefined": int(khat.numel() - defined.numel()),
        "bounded": int(torch.isneginf(defined).sum()),
        "unbounded": int(torch.isposinf(defined).sum()),
    }
    finite = defined[torch.isfinite(defined)]
    summary["median"] = (
        float(defined.median()) if defined.numel() and torch.isfinite(defined.median()) else None
    )
    summary["max"] = float(finite.max()) if finite.numel() else None
    for threshold in THRESHOLDS:
        share = float((defined > threshold).double().mean()) if defined.numel() else None
        summary[f"share_above_{threshold}"] = share
    return summary
