"""One run's settings: model, guide family, data and training, as a flat, serialisable record.

Values come from defaults, then a ``--config`` file (TOML or JSON), then command-line flags.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class RunConfig:
    # model
    model: str = "vqvae"
    num_codes: int = 64
    code_dim: int = 16
    grid: int = 7
    hidden: int = 64
    res_blocks: int = 2
    likelihood: str = "auto"
    prior: str = "uniform"
    codebook_init: str = "auto"
    restart_threshold: float = 0.0
    # guide family
    family: str = "vq"
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    init_var: float = 1.0
    temperature: float = 1.0
    temperature_min: float = 0.1
    anneal_rate: float = 1e-4
    straight_through: bool = False
    # data
    data: str | None = None
    dataset: str = "synthetic"
    train_limit: int | None = None
    # training
    epochs: int = 5
    max_steps: int | None = None  # training stops at max_steps or after epochs, whichever first
    batch_size: int = 64
    lr: float = 1e-3
    clip_norm: float = 10.0
    eval_every: int | None = None
    valid_size: int = 1000
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: expected an integer in [0, 2**32), got {self.seed}")
        positive = ("num_codes", "code_dim", "grid", "hidden", "epochs", "batch_size", "valid_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.num_codes < 2:
            raise ValueError(f"num_codes: a codebook needs K >= 2 codes, got {self.num_codes}")
        if self.res_blocks < 0:
            raise ValueError(f"res_blocks: expected a non-negative integer, got {self.res_blocks}")
        for name in ("max_steps", "eval_every", "train_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected a positive integer or nothing, got {value}")
        for name in ("lr", "clip_norm", "temperature", "temperature_min", "init_var"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        for name in ("beta", "anneal_rate", "restart_threshold"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must lie in (0, 1), got {self.ema_decay!r}")

    def _check_types(self) -> None:
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            if value is None and type(None) in allowed:
                continue
            kind = next(t for t in allowed if t is not type(None))
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown settings {unknown}")
        return cls(**values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML (``.toml``) or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file: {path}")
    text = path.read_text()
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--config: {path} is not valid {path.suffix[1:] or 'JSON'}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path} must hold a table of settings")
    return values
