"""The face: compose a model from :mod:`probvq.models` with a family from :mod:`probvq.inference`.

This is the one place (with the CLI) that imports both halves; ``models`` and ``inference`` only
build on the core.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from probvq.codebook import INITIALISERS
from probvq.config import RunConfig
from probvq.data import Dataset, load, synthetic
from probvq.inference import FAMILIES, GuideFamily, TemperatureSchedule
from probvq.likelihoods import LIKELIHOODS, likelihood_for, make_likelihood
from probvq.models import VQVAE
from probvq.models.vqvae import PRIORS

MODELS = {"vqvae": VQVAE}

DEFAULT_CODEBOOK_INIT = {"vq": "kmeans", "sq": "normal", "rr": "kmeans"}
"""``codebook_init="auto"``: k-means on the first batch for VQ and RR; for SQ a unit normal table,
as in Takida et al.'s code: codes fitted to the tiny initial encoder outputs leave every distance
far below ``2 s^2``, q starts uniform and the dequantisation term keeps it there."""


def check_names(config: RunConfig) -> None:
    """Refuse unknown model, family, likelihood, prior and initialiser names (no data needed)."""
    choices = {
        "model": sorted(MODELS),
        "family": sorted(FAMILIES),
        "likelihood": ["auto", *sorted(LIKELIHOODS)],
        "prior": list(PRIORS),
        "codebook_init": ["auto", *INITIALISERS],
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {getattr(config, name)!r}")


def resolve(config: RunConfig, dataset: Dataset) -> RunConfig:
    """Check the names in ``config`` and fill in its ``auto`` choices for ``dataset``."""
    check_names(config)
    if config.codebook_init == "auto":
        config = replace(config, codebook_init=DEFAULT_CODEBOOK_INIT[config.family])
    if config.likelihood == "auto":
        config = replace(config, likelihood=likelihood_for(dataset.kind))
    return config


def load_data(config: RunConfig) -> Dataset:
    """The run's dataset: ``--data PATH`` if given, else the named built-in dataset."""
    dataset = load(config.data) if config.data is not None else synthetic(config.dataset)
    if config.train_limit is not None:
        dataset = replace(dataset, train=dataset.train[: config.train_limit])
    return dataset


def build_model(config: RunConfig, dataset: Dataset) -> nn.Module:
    """The model named by ``config`` for images shaped like ``dataset``'s; checks the data first."""
    channels = dataset.image_shape[0]
    likelihood = make_likelihood(config.likelihood, dataset.kind, channels)
    likelihood.check(dataset.train, "data (train)")
    likelihood.check(dataset.valid, "data (valid)")
    return MODELS[config.model](
        dataset.image_shape,
        likelihood,
        num_codes=config.num_codes,
        code_dim=config.code_dim,
        grid=config.grid,
        hidden=config.hidden,
        res_blocks=config.res_blocks,
        prior=config.prior,
        codebook_init=config.codebook_init,
        restart_threshold=config.restart_threshold,
    )


def build_family(config: RunConfig, vae: nn.Module) -> GuideFamily:
    """The guide family named by ``config`` for ``vae``'s code sites."""
    sites = vae.code_sites
    if config.family == "vq":
        return FAMILIES["vq"](sites, beta=config.beta, ema=config.ema, decay=config.ema_decay)
    schedule = TemperatureSchedule(config.temperature, config.anneal_rate, config.temperature_min)
    return FAMILIES[config.family](
        sites,
        init_var=config.init_var,
        temperature=schedule,
        straight_through=config.straight_through,
    )


def build(config: RunConfig, dataset: Dataset) -> tuple[nn.Module, GuideFamily]:
    """Model and family for ``config`` (with ``auto`` choices resolved) on ``dataset``."""
    config = resolve(config, dataset)
    vae = build_model(config, dataset)
    return vae, build_family(config, vae)
