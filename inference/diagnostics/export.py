"""Diagnostics, training log and run config as ArviZ ``InferenceData`` (netCDF).

Groups, each an ``xarray.Dataset``:

* ``diagnostics`` (dim ``point``): exact and surrogate ELBO, their gap, ``iwae`` at the run's ``k``,
  the convergence curve ``iwae_curve`` (``point x iwae_k``), mean log-weight, Pareto ``khat``,
  reconstruction error, and per-site ``distortion`` (``point x observed_site``), ``rate``
  (``point x latent_site``) and ``regulariser``; the JSON summary in its ``summary`` attribute;
* ``codebook_usage``: one variable per code site, the count of each code (dim ``<site>_code``);
* ``training_log`` (dim ``step``): loss, exact and surrogate ELBO with standard errors, gap,
  temperature, per-site rate and distortion, perplexity and dead codes, from ``metrics.jsonl``;
* ``config``: the run config as attributes, and whole as JSON in the variable ``json``;
* ``log_weights`` (``point x draw``), when they were kept.

Open with ``arviz.from_netcdf(path)``, or one group with
``xarray.open_dataset(path, group="diagnostics")``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from torch import Tensor

from ..training.checkpoint import replacing
from .diagnose import Diagnostics
from .psis import load_arviz

if TYPE_CHECKING:
    from arviz import InferenceData


def _site_matrix(values: dict[str, Tensor], dim: str) -> tuple[tuple[str, str], np.ndarray] | None:
    if not values:
        return None
    return ("point", dim), np.stack([v.double().numpy() for v in values.values()], axis=1)


def diagnostics_dataset(diagnostics: Diagnostics) -> xr.Dataset:
    """The ``diagnostics`` group."""
    terms = diagnostics.terms
    data: dict[str, Any] = {
        "exact_elbo": ("point", terms.exact.double().numpy()),
        "surrogate_elbo": ("point", terms.surrogate.double().numpy()),
        "surrogate_gap": ("point", terms.gap.double().numpy()),
        "iwae": ("point", diagnostics.bound.numpy()),
        "iwae_curve": (("point", "iwae_k"), np.stack([v.numpy() for v in diagnostics.iwae.values()], 1)),
        "mean_log_weight": ("point", diagnostics.mean_log_weight.numpy()),
        "khat": ("point", diagnostics.khat.numpy()),
        "reconstruction_mse": ("point", terms.reconstruction_mse.double().numpy()),
    }
    coords: dict[str, Any] = {"point": np.arange(terms.exact.shape[0]), "iwae_k": list(diagnostics.iwae)}
    for kind, dim in (
        ("distortion", "observed_site"),
        ("rate", "latent_site"),
        ("regulariser", "penalty"),
    ):
        matrix = _site_matrix(getattr(terms, kind), dim)
        if matrix is not None:
            data[kind] = matrix
            coords[dim] = list(getattr(terms, kind))
    attrs = {
        "k": diagnostics.k,
        "observed_dims": terms.observed_dims,
        "rows_per_pass": diagnostics.rows_per_pass,
        "summary": json.dumps(diagnostics.summary(), sort_keys=True),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def usage_dataset(usage: dict[str, Tensor]) -> xr.Dataset:
    """The ``codebook_usage`` group."""
    return xr.Dataset({name: (f"{name}_code", counts.numpy()) for name, counts in usage.items()})


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def training_log_dataset(records: list[dict[str, Any]]) -> xr.Dataset:
    """The ``training_log`` group, from the records of ``metrics.jsonl``."""
    valid = [r["valid"] for r in records]
    data: dict[str, Any] = {
        "epoch": ("step", [_number(r["epoch"]) for r in records]),
        "loss": ("step", [_number(r["loss"]) for r in records]),
        "temperature": ("step", [_number(r.get("temperature")) for r in records]),
        "seconds": ("step", [_number(r["seconds"]) for r in records]),
    }
    for name in ("exact_elbo", "surrogate_elbo", "surrogate_gap"):
        data[name] = ("step", [_number(v[name]["mean"]) for v in valid])
        data[f"{name}_se"] = ("step", [_number(v[name]["se"]) for v in valid])
    coords: dict[str, Any] = {"step": [int(r["step"]) for r in records]}
    sites = {
        "rate": "latent_site",
        "distortion": "observed_site",
        "perplexity": "code_site",
        "dead_codes": "code_site",
    }
    for kind, dim in sites.items():
        names = list(valid[0].get(kind, {})) if valid else []
        if not names:
            continue
        rows = [[v[kind][name] for name in names] for v in valid]
        data[kind] = (
            ("step", dim),
            [[_number(c["mean"] if isinstance(c, dict) else c) for c in r] for r in rows],
        )
        coords[dim] = names
    return xr.Dataset(data, coords=coords)


def config_dataset(config: dict[str, Any]) -> xr.Dataset:
    """The ``config`` group: plain values as attributes (``None`` left out, booleans as text)."""
    attrs = {
        key: str(value) if isinstance(value, bool) else value
        for key, value in config.items()
        if isinstance(value, str | int | float)
    }
    return xr.Dataset({"json": ((), json.dumps(config, sort_keys=True))}, attrs=attrs)


def to_inference_data(
    diagnostics: Diagnostics,
    training_log: list[dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
) -> InferenceData:
    """An ``arviz.InferenceData`` holding the groups above (those with content)."""
    groups = {
        "diagnostics": diagnostics_dataset(diagnostics),
        "codebook_usage": usage_dataset(diagnostics.terms.usage),
    }
    if training_log:
        groups["training_log"] = training_log_dataset(training_log)
    if config is not None:
        groups["config"] = config_dataset(config)
    if diagnostics.log_weights is not None:
        groups["log_weights"] = xr.Dataset(
            {"log_weights": (("point", "draw"), diagnostics.log_weights.numpy())},
            coords={"point": np.arange(diagnostics.log_weights.shape[0])},
        )
    return load_arviz().InferenceData(
        **{name: group for name, group in groups.items() if group.data_vars}
    )


def write_netcdf(path: str | Path, idata: InferenceData) -> None:
    """Write ``idata`` to ``path`` atomically (a temporary file renamed into place)."""
    with replacing(path) as tmp:
        idata.to_netcdf(str(tmp))
