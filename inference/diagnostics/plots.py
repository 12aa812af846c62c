"""PNG plots of a run's diagnostics (matplotlib, no display needed).

* ``training_curves.png``: the training loss as a surrogate ELBO, and the validation surrogate and
  exact ELBO (with standard errors) over steps; the space between them is the surrogate gap;
* ``rates.png``: rate per latent site (KL or ``log q - log p``) with standard errors, in nats;
* ``codebook_usage.png``: per code site, how often each code was drawn, most used first;
* ``reconstructions.png``: the first data points above the likelihood's mean given exact codes;
* ``khat.png``: histogram of Pareto k-hat with the 0.5 and 0.7 thresholds.

Each is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from probvq.codebook import perplexity

from ..training.checkpoint import replacing
from .diagnose import Diagnostics
from .psis import THRESHOLDS


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    with replacing(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def training_curves(records: list[dict[str, Any]], path: Path) -> Path:
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    steps = np.array([r["step"] for r in records])
    axes.plot(steps, [-r["loss"] for r in records], label="training surrogate (-loss)", color="0.6")
    for name, colour in (("surrogate_elbo", "tab:orange"), ("exact_elbo", "tab:blue")):
        mean = np.array([r["valid"][name]["mean"] for r in records])
        se = np.array([r["valid"][name]["se"] or 0.0 for r in records])
        axes.plot(steps, mean, label=f"validation {name.replace('_', ' ')}", color=colour)
        axes.fill_between(steps, mean - se, mean + se, color=colour, alpha=0.25)
    axes.set(xlabel="step", ylabel="nats per example", title="ELBO during training")
    axes.legend()
    return _save(figure, path)


def rates(summary: dict[str, Any], path: Path) -> Path:
    names = list(summary["rate"])
    figure = Figure(figsize=(max(4, 1.2 * len(names) + 2), 4))
    axes = figure.add_subplot()
    means = [summary["rate"][n]["mean"] for n in names]
    errors = [summary["rate"][n]["se"] or 0.0 for n in names]
    axes.bar(names, means, yerr=errors, capsize=4, color="tab:blue")
    distortion = sum(site["mean"] for site in summary["distortion"].values())
    axes.set(ylabel="nats per example", title=f"rate per latent site (distortion {distortion:.2f} nats)")
    return _save(figure, path)


def codebook_usage(usage: dict[str, Tensor], path: Path) -> Path:
    figure = Figure(figsize=(7, 2.6 * len(usage)))
    for row, (name, counts) in enumerate(usage.items(), 1):
        axes = figure.add_subplot(len(usage), 1, row)
        share = np.sort(counts.double().numpy())[::-1] / max(1, int(counts.sum()))
        axes.bar(np.arange(len(share)), share, width=1.0, color="tab:green")
        dead = int((counts == 0).sum())
        title = f"{name}: perplexity {perplexity(counts):.1f} of {len(share)}, {dead} dead"
        axes.set(xlabel="code (most used first)", ylabel="share of draws", title=title)
    return _save(figure, path)


def _as_images(values: Tensor) -> np.ndarray | None:
    """``(n, H, W)`` or ``(n, H, W, C)`` for display, or ``None`` when there is no image shape."""
    array = values.double().numpy()
    if array.ndim == 2:
        side = math.isqrt(array.shape[1])
        return array.reshape(-1, side, side) if side * side == array.shape[1] else None
    if array.ndim == 4 and array.shape[1] in (1, 3):
        return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
    return array if array.ndim == 3 else None


def reconstructions(data: Tensor, mean: Tensor, path: Path) -> Path | None:
    shown = [_as_images(data), _as_images(mean)]
    if shown[0] is None or shown[1] is None:
        return None
    low = min(a.min() for a in shown)
    high = max(max(a.max() for a in shown), low + 1e-12)
    columns = shown[0].shape[0]
    figure = Figure(figsize=(columns * 0.9, 2.2))
    for row, (images, label) in enumerate(zip(shown, ("data", "reconstruction"), strict=True)):
        for column, image in enumerate(images):
            axes = figure.add_subplot(2, columns, row * columns + column + 1)
            axes.imshow((image - low) / (high - low), cmap="gray", vmin=0.0, vmax=1.0)
            axes.set_axis_off()
            if column == 0:
                axes.set_title(label, fontsize=8, loc="left")
    return _save(figure, path)


def khat(values: Tensor, path: Path) -> Path:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    finite = values[values.isfinite()].numpy()
    axes.hist(finite, bins=40, color="tab:purple")
    for threshold, style in zip(THRESHOLDS, ("--", "-"), strict=True):
        axes.axvline(threshold, color="tab:red", linestyle=style, label=f"k = {threshold}")
    bounded = int(np.isneginf(values.numpy()).sum())
    note = f"; {bounded} of {values.numel()} points with bounded weights (k = -inf)" if bounded else ""
    axes.set(xlabel="Pareto k-hat", ylabel="points", title=f"PSIS k-hat per point{note}")
    axes.title.set_fontsize(9)
    axes.legend()
    return _save(figure, path)


def write_plots(
    diagnostics: Diagnostics, records: list[dict[str, Any]], folder: str | Path
) -> list[Path]:
    """Write every plot that has data into ``folder``; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = diagnostics.summary()
    jobs: list[tuple[str, Callable[[Path], Path | None]]] = [
        ("rates.png", lambda p: rates(summary, p)),
        ("khat.png", lambda p: khat(diagnostics.khat, p)),
    ]
    if records:
        jobs.insert(0, ("training_curves.png", lambda p: training_curves(records, p)))
    if diagnostics.terms.usage:
        jobs.append(("codebook_usage.png", lambda p: codebook_usage(diagnostics.terms.usage, p)))
    if diagnostics.reconstructions is not None:
        jobs.append(("reconstructions.png", lambda p: reconstructions(*diagnostics.reconstructions, p)))
    written = [job(folder / name) for name, job in jobs]
    return [path for path in written if path is not None]


def image_grid(
    images: Tensor,
    path: Path,
    value_range: tuple[float, float] | None = None,
    title: str | None = None,
) -> Path:
    """``images`` ``(n, C, H, W)`` as one PNG grid, ``value_range`` (or min to max) black to white."""
    shown = _as_images(images)
    if shown is None:
        raise ValueError(f"images: expected (n, C, H, W) with C 1 or 3, got {tuple(images.shape)}")
    low, high = value_range if value_range is not None else (float(shown.min()), float(shown.max()))
    shown = np.clip((shown - low) / max(high - low, 1e-12), 0.0, 1.0)
    columns = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(columns * 0.8, rows * 0.8 + (0.3 if title else 0.0)))
    for index, image in enumerate(shown):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        axes.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=8)
    return _save(figure, path)
