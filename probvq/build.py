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
from probvq.inference import FAMILIES, FamilyStack, GuideFamily
from probvq.likelihoods import LIKELIHOODS, likelihood_for, make_likelihood
from probvq.models import HQVAE, RBMVAE, VQVAE, DeepVAE
from probvq.models.hqvae import parse_layers
from probvq.models.rbm import ENERGY_STAGES, STAGES
from probvq.models.vqvae import PRIORS
from probvq.sites import CodeGroup

MODELS = {"vqvae": VQVAE, "deep": DeepVAE, "hqvae": HQVAE, "rbm": RBMVAE}
GRID = ("num_codes", "code_dim", "grid", "hidden", "res_blocks", "codebook_init", "restart_threshold")
SETTINGS = {
    "vqvae": (*GRID, "prior", "prior_hidden", "prior_layers"),
    "deep": (*GRID, "num_layers", "levels"),
    "hqvae": (*GRID, "prior", "layers", "shared_codebook"),
    "rbm": ("hidden", "latent_units", "rbm_hidden", "pcd_chains", "gibbs_sweeps", "ais_chains",
            "ais_steps", "stages", "stage_epochs"),
}  # fmt: skip
"""The settings each model takes; a setting of another model must keep its default."""
PLAN = ("stages", "stage_epochs")
"""Settings of a staged model that plan its run (:func:`stage_plan`) rather than build it."""


def staged(config: RunConfig) -> bool:
    """Whether ``config``'s model trains in stages (it takes ``stages`` and has ``start_stage``)."""
    return "stages" in SETTINGS[config.model]


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
    defaults = RunConfig()
    for model, own in SETTINGS.items():
        for name in own:
            if name not in SETTINGS[config.model] and getattr(config, name) != getattr(defaults, name):
                raise ValueError(
                    f"{name}: a setting of the {model!r} model, not of {config.model!r} "
                    f"(leave it at {getattr(defaults, name)!r})"
                )
    if config.free_bits:
        named = [config.family, *(n.strip() for n in (config.site_families or "").split(","))]
        for name in dict.fromkeys(n for n in named if n in FAMILIES):
            refused = FAMILIES[name].cls.elbo_class.free_bits_refused
            if refused:
                raise ValueError(f"free_bits: the {name!r} family's objective {refused}")
    if config.model == "hqvae":
        parse_layers(config.layers)
    if staged(config):
        energy = [stage for stage, _ in stage_plan(config) if stage in ENERGY_STAGES]
        if config.free_bits and energy:
            raise ValueError(
                f"free_bits: the {config.model!r} model's stage(s) {', '.join(energy)} have an "
                "energy prior, whose log Z is known in training only through its gradient, so a "
                "floor on the rate would zero the prior's gradient; leave free_bits at 0 there"
            )


def stage_plan(config: RunConfig) -> list[tuple[str, int]]:
    """``(stage, epochs)`` of a staged model's run: ``config.stages`` (default: one ``joint``
    stage) with ``config.stage_epochs`` (default: ``config.epochs`` each)."""
    stages = [name.strip() for name in (config.stages or "joint").split(",")]
    for name in stages:
        if name not in STAGES:
            raise ValueError(f"stages: expected a comma list of {STAGES}, got {config.stages!r}")
    if len(set(stages)) != len(stages):
        raise ValueError(f"stages: each stage runs once, got {config.stages!r}")
    if not config.stage_epochs:
        return [(name, config.epochs) for name in stages]
    try:
        epochs = [int(n) for n in config.stage_epochs.split(",")]
    except ValueError:
        epochs = []
    if len(epochs) != len(stages) or min(epochs) < 1:
        raise ValueError(
            f"stage_epochs: expected {len(stages)} positive integers, one per stage of "
            f"{','.join(stages)}, got {config.stage_epochs!r}"
        )
    return list(zip(stages, epochs, strict=True))


def resolve_family(config: RunConfig) -> RunConfig:
    """Check the names in ``config`` and complete its family's settings from the registry.

    ``codebook_init="auto"`` becomes what the family registered (k-means on the first batch for VQ
    and RR; for SQ a unit normal table, as in Takida et al.'s code, because codes fitted to the tiny
    initial encoder outputs leave every distance far below ``2 s^2``: q starts uniform and the
    dequantisation term keeps it there).
    """
    check_names(config)
    spec = FAMILIES[config.family]
    settings = spec.resolve(config.family_settings, source=f"[{config.family}]")
    config = replace(config, family_settings=settings)
    if config.codebook_init == "auto" and "codebook_init" in SETTINGS[config.model]:
        config = replace(config, codebook_init=spec.codebook_init)
    return config


def resolve(config: RunConfig, dataset: Dataset) -> RunConfig:
    """Check ``config`` and fill in its family's settings and its ``auto`` choices for ``dataset``."""
    config = resolve_family(config)
    if config.likelihood == "auto":
        config = replace(config, likelihood=likelihood_for(dataset.kind))
    return config


def load_data(config: RunConfig) -> Dataset:
    """The run's dataset: ``--data PATH`` if given, else the named built-in dataset."""
    if config.data is None and config.holdout is not None:
        raise ValueError("holdout: the built-in datasets have their own validation split")
    dataset = load(config.data, config.holdout) if config.data is not None else synthetic(config.dataset)
    if config.train_limit is not None:
        dataset = replace(dataset, train=dataset.train[: config.train_limit])
    return dataset


def build_model(config: RunConfig, dataset: Dataset) -> nn.Module:
    """The model named by ``config`` for images shaped like ``dataset``'s; checks the data first."""
    channels = dataset.image_shape[0]
    likelihood = make_likelihood(config.likelihood, dataset.kind, channels)
    likelihood.check(dataset.train, "data (train)")
    likelihood.check(dataset.valid, "data (valid)")
    settings = {name: getattr(config, name) for name in SETTINGS[config.model] if name not in PLAN}
    if staged(config):
        settings["stage"] = stage_plan(config)[-1][0]
    return MODELS[config.model](dataset.image_shape, likelihood, **settings)


def site_families(config: RunConfig, vae: nn.Module) -> list[str]:
    """The family of each of ``vae``'s code sites (top first): ``config.site_families`` or all
    ``config.family``; a residual group's sites must share one (a family answers a group whole)."""
    sites = [site.name for site in vae.code_sites]
    if not config.site_families:
        return [config.family] * len(sites)
    names = [name.strip() for name in config.site_families.split(",")]
    if len(names) != len(sites):
        raise ValueError(
            f"site_families: expected {len(sites)} families, one per site ({', '.join(sites)}), "
            f"got {config.site_families!r}"
        )
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"site_families: expected families of {sorted(FAMILIES)}, got {name!r}")
    chosen = dict(zip(sites, names, strict=True))
    for group in vae.modules():
        members = [site.name for site in group.sites] if isinstance(group, CodeGroup) else []
        if len({chosen[name] for name in members}) > 1:
            raise ValueError(
                f"site_families: the residual group {group.name!r} ({', '.join(members)}) is "
                "answered by one family; give its sites the same one"
            )
    return names


def build_family(config: RunConfig, vae: nn.Module) -> GuideFamily | FamilyStack:
    """The guide family named by ``config`` for ``vae``'s code sites, or, with per-site families,
    a :class:`FamilyStack` of them (``config.family`` with its settings, the others at their
    defaults)."""
    names = site_families(config, vae)
    if set(names) == {config.family}:
        return FAMILIES[config.family].build(vae.code_sites, config.family_settings)
    families = []
    for name in dict.fromkeys(names):
        claims = [
            site.name for site, chosen in zip(vae.code_sites, names, strict=True) if chosen == name
        ]
        settings = config.family_settings if name == config.family else {}
        families.append(
            FAMILIES[name].cls(vae.code_sites, claims=claims, **FAMILIES[name].resolve(settings))
        )
    return FamilyStack(*families)


def build(config: RunConfig, dataset: Dataset) -> tuple[nn.Module, GuideFamily | FamilyStack]:
    """Model and family for ``config`` (with ``auto`` choices resolved) on ``dataset``."""
    config = resolve(config, dataset)
    vae = build_model(config, dataset)
    return vae, build_family(config, vae)
