"""One run's settings: model, guide family, data and training, as a serialisable record.

Values come from defaults, then a ``--config`` file (TOML or JSON), then command-line flags. The
guide family's own settings form a section named after it (``[sq]`` in TOML, ``"sq": {...}`` in
JSON); which settings a family has is the family registry's business
(:mod:`probvq.inference.families.registry`), checked by :func:`probvq.build.resolve`.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16")


@dataclass
class RunConfig:
    # model
    model: str = "vqvae"
    num_layers: int = 1  # deep: layers of codes (1 to 32)
    levels: int = 1  # deep: resolutions the layers are spread over
    layers: str = "injected,injected"  # hqvae: layer kinds, top first (injected / residual)
    shared_codebook: bool = False  # hqvae: one codebook for every layer
    num_codes: int = 64
    code_dim: int = 16
    grid: int = 7
    hidden: int = 64
    res_blocks: int = 2
    likelihood: str = "auto"
    prior: str = "uniform"
    prior_hidden: int = 64  # pixelcnn prior: channels of its stacks
    prior_layers: int = 8  # pixelcnn prior: gated layers
    codebook_init: str = "auto"
    restart_threshold: float = 0.0
    latent_units: int = 200  # rbm: binary latent units D
    rbm_hidden: int = 200  # rbm: hidden units M of the RBM prior (summed out)
    pcd_chains: int = 100  # rbm: persistent Gibbs chains for the gradient of log Z
    gibbs_sweeps: int = 1  # rbm: Gibbs sweeps of the chains per step (PCD-k)
    ais_chains: int = 100  # rbm: AIS runs estimating log Z at each evaluation
    ais_steps: int = 1000  # rbm: AIS intermediate temperatures
    stages: str = ""  # staged models (rbm): e.g. pretrain,rbm,joint ("" = joint)
    stage_epochs: str = ""  # one number of epochs per stage ("" = epochs for each)
    # guide family, and its section of settings (the family's defaults where not given)
    family: str = "vq"
    family_settings: dict[str, Any] = field(default_factory=dict)
    site_families: str = ""  # one family per code site, top first ("" = `family` everywhere)
    # data
    data: str | None = None
    dataset: str = "synthetic"
    train_limit: int | None = None
    holdout: int | None = None  # data without a validation split: hold out its last N (else a tenth)
    # training
    epochs: int = 5
    max_steps: int | None = None  # training stops at max_steps or after epochs, whichever first
    batch_size: int = 64
    lr: float = 1e-3
    clip_norm: float = 10.0
    skip_spikes: float | None = None  # skip a step whose gradient norm exceeds this x the median
    kl_warmup: int = 0  # steps over which the rate's weight rises linearly from 0 to 1
    free_bits: float = 0.0  # floor on each latent's batch-averaged rate (nats per example)
    eval_every: int | None = None
    valid_size: int = 1000
    seed: int = 0
    checkpoint_every: int = 250
    max_bad_steps: int = 10  # consecutive skipped (non-finite) steps before the run stops
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    out: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: expected an integer in [0, 2**32), got {self.seed}")
        positive = (
            "num_layers", "levels", "prior_hidden", "prior_layers", "num_codes", "code_dim", "grid",
            "hidden", "epochs", "batch_size", "valid_size", "checkpoint_every", "max_bad_steps",
            "latent_units", "rbm_hidden", "pcd_chains", "gibbs_sweeps", "ais_chains", "ais_steps",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.num_codes < 2:
            raise ValueError(f"num_codes: a codebook needs K >= 2 codes, got {self.num_codes}")
        if self.res_blocks < 0:
            raise ValueError(f"res_blocks: expected a non-negative integer, got {self.res_blocks}")
        for name in ("max_steps", "eval_every", "train_limit", "holdout"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected a positive integer or nothing, got {value}")
        for name in ("lr", "clip_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if self.kl_warmup < 0:
            raise ValueError(f"kl_warmup: expected a non-negative number of steps, got {self.kl_warmup}")
        if not math.isfinite(self.free_bits) or self.free_bits < 0:
            raise ValueError(f"free_bits: expected non-negative nats, got {self.free_bits!r}")
        if self.skip_spikes is not None and not (
            math.isfinite(self.skip_spikes) and self.skip_spikes > 1
        ):
            raise ValueError(
                f"skip_spikes: expected a factor above 1 (times the median gradient norm), "
                f"got {self.skip_spikes!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.out is not None and not self.out.strip():
            raise ValueError("out: expected a directory path, got an empty string")
        if not math.isfinite(self.restart_threshold) or self.restart_threshold < 0:
            raise ValueError(
                f"restart_threshold: expected a non-negative number, got {self.restart_threshold!r}"
            )

    def _check_types(self) -> None:
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            if value is None and type(None) in allowed:
                continue
            if typing.get_origin(hint) is dict:
                allowed = (dict,)
            kind = next(t for t in allowed if t is not type(None))
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values; the family's settings under the family's name."""
        values = asdict(self)
        values[self.family] = values.pop("family_settings")
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """The inverse of :meth:`to_dict`: the section named by ``family`` holds its settings."""
        values = dict(values)
        family = values.get("family", cls.family)
        if "family_settings" in values:
            raise ValueError(f"{source}: give the family's settings as a section [{family}]")
        section = values.pop(family, {}) if isinstance(family, str) else {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: [{family}] must be a table of the family's settings")
        known = {f.name for f in fields(cls)} - {"family_settings"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown settings {unknown} (a family's settings go in the section "
                f"named after the chosen family, here [{family}])"
            )
        return cls(**values, family_settings=section)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML (``.toml``) or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        raise ValueError(
            f"--config: {path}: YAML is not supported; write the settings as .toml or .json"
        )
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"--config: {path} is not a text file ({err})") from err
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--config: {path} is not valid {path.suffix[1:] or 'JSON'}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path} must hold a table of settings")
    return values
