"""The ``probvq`` command: ``train`` a model under a guide family; ``evaluate``, ``diagnose`` or
``sample`` from a run; ``fit-prior`` fits a second-stage PixelCNN to a run's codes.

Settings come from defaults, then ``--config FILE`` (TOML or JSON), then flags. Errors in the input
(missing files, bad data, bad settings, foreign checkpoints) are reported in one line before any
work starts, and nothing an earlier run wrote is touched. ``train --resume RUN_DIR`` continues a run
from its newest good checkpoint. Launched by ``torchrun``, ``train`` joins the process group (gloo
on the CPU, nccl on CUDA) and trains data-parallel; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn

from probvq import distributed
from probvq.build import build, load_data, resolve, resolve_family, stage_plan, staged
from probvq.config import RunConfig, read_config_file
from probvq.data import Dataset
from probvq.inference import FAMILIES, RunDir, diagnose, evaluate, fit, load_checkpoint
from probvq.inference.diagnostics import check_settings
from probvq.inference.diagnostics.export import to_inference_data, write_netcdf
from probvq.inference.diagnostics.plots import image_grid, write_plots
from probvq.inference.sampling import ancestral_trace, likelihood_mean
from probvq.inference.training.checkpoint import (
    WriteError,
    new_directory,
    save_checkpoint,
    write_json,
)
from probvq.inference.training.prior import check_fit_settings, extract_codes, fit_prior
from probvq.inference.training.train import DivergenceError, TrainingInterruptedError
from probvq.pixelcnn import GatedPixelCNN, UpperContext
from probvq.sites import CodeSite
from probvq.swap import WithPriors

HELP = {
    "model": "model to train (vqvae, deep, hqvae, rbm)",
    "layers": "hqvae: layer kinds top first, e.g. injected,injected or residual,residual",
    "shared_codebook": "hqvae: one codebook shared by every layer",
    "site_families": "one family per code site, top first, e.g. sq,vq (default: --family for all)",
    "holdout": "for data without a validation split: hold out its last N examples (default: a tenth)",
    "num_layers": "deep: layers of codes, 1 to 32",
    "levels": "deep: resolutions the layers are spread over (grid, 2 grid, ...)",
    "num_codes": "codebook size K",
    "code_dim": "code dimension D",
    "grid": "side of the latent grid (image side / grid must be a power of two)",
    "hidden": "channels of the conv encoder and decoder",
    "res_blocks": "residual blocks in encoder and decoder",
    "likelihood": "auto, bernoulli, logistic (8-bit) or gaussian",
    "prior": "uniform, learned (logits per position) or pixelcnn (vqvae: trained jointly) prior",
    "prior_hidden": "vqvae --prior pixelcnn: channels of the PixelCNN",
    "prior_layers": "vqvae --prior pixelcnn: gated layers of the PixelCNN",
    "codebook_init": "auto, normal, uniform, data or kmeans",
    "latent_units": "rbm: binary latent units D",
    "rbm_hidden": "rbm: hidden units of the RBM prior, summed out of its free energy",
    "pcd_chains": "rbm: persistent Gibbs chains estimating the gradient of log Z",
    "gibbs_sweeps": "rbm: Gibbs sweeps of the persistent chains per step (PCD-k)",
    "ais_chains": "rbm: annealed-importance-sampling runs for log Z at each evaluation",
    "ais_steps": "rbm: intermediate temperatures of each AIS run",
    "stages": "rbm: stages to run in order, of pretrain (factorial prior), rbm (fit the RBM to the "
    "codes), joint (default: joint)",
    "stage_epochs": "rbm: epochs of each stage, e.g. 10,5,10 (default: --epochs each)",
    "restart_threshold": "restart codes whose usage EMA falls below this (0: never)",
    "data": "dataset file or directory (.amat, .npz/.npy, MNIST idx, CIFAR-10 batches)",
    "dataset": "built-in dataset when --data is not given: synthetic or synthetic-rgb",
    "train_limit": "use only the first N training examples",
    "epochs": "passes over the training data",
    "max_steps": "stop after this many steps (or after --epochs, whichever comes first)",
    "batch_size": "examples per step",
    "lr": "Adam learning rate",
    "clip_norm": "global gradient-norm clip",
    "skip_spikes": "skip (and log) a step whose gradient norm exceeds this factor times the median "
    "of the last 100 (default: never)",
    "kl_warmup": "steps over which the rate's weight rises linearly from 0 to 1",
    "free_bits": "floor on each latent's batch-averaged rate, nats per example",
    "eval_every": "steps between validation evaluations (default: once per epoch)",
    "valid_size": "validation examples evaluated during training",
    "seed": "random seed",
    "checkpoint_every": "steps between resumable checkpoints (last.pt)",
    "max_bad_steps": "consecutive steps with a non-finite loss or gradient before the run stops",
    "device": "cpu or cuda",
    "precision": "fp32, or bf16 autocast (distances, softmaxes over codes, KLs stay float32)",
    "compile": "compile the model's networks with torch.compile",
    "out": "new run directory (default: runs/<model>-<family>-<time>)",
    "quiet": "no progress bar",
}


def _scalar_type(hint: object) -> type:
    """``int`` for ``int``, ``int | None`` alike."""
    if isinstance(hint, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint  # type: ignore[return-value]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_flag(parser: argparse.ArgumentParser, name: str, kind: type, helptext: str) -> None:
    if kind is bool:
        parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, help=helptext)
    else:
        parser.add_argument(_flag(name), type=kind, help=helptext)


def family_flags() -> dict[str, list[str]]:
    """Each family setting's name and the registered families that have it."""
    owners: dict[str, list[str]] = {}
    for spec in FAMILIES.values():
        for name in spec.settings:
            owners.setdefault(name, []).append(spec.name)
    return owners


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML or JSON file of settings (flags override it)")
    hints = typing.get_type_hints(RunConfig)
    listing = "; ".join(f"{spec.name}: {spec.summary}" for spec in FAMILIES.values())
    parser.add_argument("--family", help=f"guide family ({listing}) (default: vq)")
    for f in fields(RunConfig):
        if f.name in ("family", "family_settings"):
            continue
        text = HELP[f.name] if "default" in HELP[f.name] else f"{HELP[f.name]} (default: {f.default})"
        _add_flag(parser, f.name, _scalar_type(hints[f.name]), text)
    group = parser.add_argument_group("family settings (each applies to the families named)")
    for name, owners in family_flags().items():
        first = FAMILIES[owners[0]].settings[name]
        defaults = ", ".join(f"{o} {FAMILIES[o].settings[name].default}" for o in owners)
        _add_flag(group, name, first.type, f"{'/'.join(owners)}: {first.help} (default: {defaults})")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = read_config_file(args.config) if args.config else {}
    RunConfig.from_dict(values, source=f"--config {args.config}")
    flags = {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "family_settings"}
    values.update({name: value for name, value in flags.items() if value is not None})
    family = values.get("family", RunConfig.family)
    for name, owners in family_flags().items():
        value = getattr(args, name)
        if value is None:
            continue
        if family not in owners:
            raise ValueError(
                f"{_flag(name)}: a setting of {'/'.join(owners)}, not of the chosen family {family!r}"
            )
        values.setdefault(family, {})[name] = value
    return RunConfig.from_dict(values)


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device: {err}") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device} asked for, but CUDA is not available here")


def _join_process_group(config: RunConfig) -> RunConfig:
    """Under ``torchrun``, join its process group and take this rank's device."""
    if "LOCAL_RANK" not in os.environ or torch.distributed.is_initialized():
        return config
    local = int(os.environ["LOCAL_RANK"])
    if torch.device(config.device).type == "cuda":
        torch.cuda.set_device(local)
        config = replace(config, device=f"cuda:{local}")
    backend = "nccl" if torch.device(config.device).type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend)
    return config


def _warn(message: str) -> None:
    if distributed.is_main():
        print(f"probvq: warning: {message}", file=sys.stderr)


def _check_lengths(config: RunConfig, dataset: Dataset) -> None:
    """Warn about legal but suspicious settings (after the data is known)."""
    n = dataset.train.shape[0]
    if config.batch_size > n:
        _warn(f"--batch-size {config.batch_size} exceeds the {n} training examples; using {n}")
    if config.valid_size > dataset.valid.shape[0]:
        _warn(f"--valid-size {config.valid_size}: only {dataset.valid.shape[0]} validation examples")
    steps = config.epochs * max(1, n // min(config.batch_size, n))
    steps = min(steps, config.max_steps) if config.max_steps else steps
    if config.eval_every is not None and config.eval_every > steps:
        _warn(f"--eval-every {config.eval_every} exceeds the run's {steps} steps; it runs at the end")


def _seeded_build(config: RunConfig, dataset: Dataset) -> tuple[nn.Module, nn.Module]:
    """Model and family, initialised from ``config.seed``; building runs every check of both."""
    pyro.set_rng_seed(config.seed)
    return build(config, dataset)


def _fit(
    run: RunDir | None,
    config: RunConfig,
    dataset: Dataset,
    built: tuple[nn.Module, nn.Module],
    resume: dict | None,
    quiet: bool,
) -> int:
    vae, family = built
    prepare = vae.likelihood.prepare
    settings = replace(config, quiet=quiet)
    result = fit(vae, family, prepare(dataset.train), prepare(dataset.valid), settings, run, resume)
    if run is None:
        return 0
    summary = {
        "run_dir": str(run.path),
        "steps": result.steps,
        "skipped_steps": len(result.faults),
        "best_step": result.best["step"],
        "best": result.best["valid"],
        "final": result.history[-1]["valid"],
    }
    write_json(run.path / "summary.json", summary)
    print(json.dumps(summary))
    return 0


def _multistage(config: RunConfig) -> bool:
    """A run of several stages, each in a directory of its own (one stage is an ordinary run)."""
    return staged(config) and len(stage_plan(config)) > 1


def _latest(run: RunDir) -> dict | None:
    """The newest good checkpoint of ``run`` (``None`` before its first), warning of bad ones."""
    state, problems = run.latest()
    for problem in problems:
        _warn(f"{problem}; resuming from the checkpoint before it")
    return state


def _cut_back(run: RunDir, state: dict | None) -> None:
    """Before resuming from ``state``: remove stale temporaries and cut the logs back to it."""
    if distributed.is_main():
        run.clear_temporaries()
        progress = state["progress"] if state is not None else {"history": [], "faults": []}
        run.rewrite_log(progress["history"])
        run.rewrite_log(progress["faults"], "faults")


def _stage_dirs(run: RunDir, config: RunConfig) -> list[tuple[RunConfig, Path]]:
    """Each stage's config (the plan's, with that stage alone and its epochs) and directory."""
    return [
        (replace(config, stages=name, stage_epochs="", epochs=epochs, out=str(run.path / name)),
         run.path / name)
        for name, epochs in stage_plan(config)
    ]  # fmt: skip


def _train_stages(run: RunDir, config: RunConfig, dataset: Dataset, quiet: bool) -> int:
    """Run the stages of a staged model, each in its own run directory under ``run``.

    A finished stage (``final.pt``) is kept; an interrupted one resumes from its newest good
    checkpoint; a new one starts from the previous stage's final model (a fresh optimiser and
    family) and the model's ``start_stage``.
    """
    if distributed.active():
        raise ValueError("stages: staged models train in one process (not under torchrun)")
    previous: Path | None = None
    finished = []
    for stage_config, path in _stage_dirs(run, config):
        if not (path / "final.pt").exists():
            built = _seeded_build(stage_config, dataset)
            state = None
            if path.exists():
                stage = RunDir.open(path)
                state = _latest(stage)
                _cut_back(stage, state)
            else:
                stage = RunDir.create(path, stage_config.to_dict())
            if state is None:
                if previous is not None:
                    built[0].load_state_dict(load_checkpoint(previous)["model"])
                built[0].start_stage()
            _fit(stage, stage_config, dataset, built, state, quiet)
        previous = path / "final.pt"
        finished.append(
            {"stage": stage_config.stages, **json.loads((path / "summary.json").read_text())}
        )
    write_json(run.path / "summary.json", {"run_dir": str(run.path), "stages": finished})
    return 0


def train_command(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return resume_command(args)
    config = _join_process_group(resolve_family(config_from_args(args)))
    _check_device(config.device)
    out = config.out or f"runs/{config.model}-{config.family}-{time.strftime('%Y%m%d-%H%M%S')}"
    RunDir.check_new(out)
    dataset = load_data(config)
    config = replace(resolve(config, dataset), out=str(out))
    built = _seeded_build(config, dataset)  # every check, before a directory appears
    _check_lengths(config, dataset)
    distributed.barrier()
    run = RunDir.create(out, config.to_dict()) if distributed.is_main() else None
    try:
        if run is not None and _multistage(config):
            return _train_stages(run, config, dataset, config.quiet)
        if staged(config):
            built[0].start_stage()
        return _fit(run, config, dataset, built, None, config.quiet)
    except (DivergenceError, OSError, ValueError):
        # A run that never reached a checkpoint holds nothing to resume: leave no directory.
        if run is not None and not run.checkpoint("last").exists() and not _multistage(config):
            run.discard()
        raise


def resume_command(args: argparse.Namespace) -> int:
    given = [_flag(f.name) for f in fields(RunConfig) if f.name not in ("family_settings", "quiet")
             if getattr(args, f.name) is not None] + [
        _flag(name) for name in family_flags() if getattr(args, name) is not None
    ] + (["--config"] if args.config else [])  # fmt: skip
    if given:
        raise ValueError(
            f"--resume: a resumed run keeps its own settings; drop {', '.join(given)} "
            "(or start a new run)"
        )
    run = RunDir.open(args.resume)
    config = RunConfig.from_dict(run.config(), source=f"{run.path}/config.json")
    config = _join_process_group(resolve_family(config))
    _check_device(config.device)
    if _multistage(config):
        if all((path / "final.pt").exists() for _, path in _stage_dirs(run, config)):
            raise ValueError(f"--resume: {run.path} already finished every stage")
        return _train_stages(run, config, load_data(config), args.quiet or config.quiet)
    state = _latest(run)
    if state is not None and state["step"] >= state["total_steps"]:
        raise ValueError(f"--resume: {run.path} already finished its {state['total_steps']} steps")
    dataset = load_data(config)
    if state is not None and list(dataset.image_shape) != state["image_shape"]:
        raise ValueError(
            f"data: {config.data or config.dataset} now holds images {tuple(dataset.image_shape)}, "
            f"the run was trained on {tuple(state['image_shape'])}"
        )
    built = _seeded_build(config, dataset)
    _cut_back(run, state)
    distributed.barrier()
    writer = run if distributed.is_main() else None
    return _fit(writer, config, dataset, built, state, args.quiet or config.quiet)


def _check_selection(args: argparse.Namespace) -> None:
    if args.limit is not None and args.subset is not None:
        raise ValueError("--limit, --subset: give one of them, not both")
    for flag, value in (("--limit", args.limit), ("--subset", args.subset)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected a positive integer, got {value}")


def _select(args: argparse.Namespace, images: Tensor) -> tuple[Tensor, dict]:
    """The examples chosen by ``--limit`` (the first N) or ``--subset`` (N at random, seeded), and
    a record of the choice for the report."""
    n = images.shape[0]
    if args.subset is not None:
        if args.subset > n:
            raise ValueError(f"--subset: asked for {args.subset} examples, the split holds {n}")
        generator = torch.Generator().manual_seed(args.seed)
        index = torch.randperm(n, generator=generator)[: args.subset].sort().values
        return images[index], {"subset": args.subset, "subset_seed": args.seed, "split_size": n}
    if args.limit is not None and args.limit > n:
        _warn(f"--limit {args.limit}: the split holds only {n} examples; using all of them")
    return images[: args.limit], {"limit": args.limit, "split_size": n}


@dataclass
class _Loaded:
    """A run opened for evaluation: its config and checkpoint, model and family, chosen data."""

    run: RunDir
    config: RunConfig
    state: dict
    vae: nn.Module
    family: nn.Module
    x: Tensor
    report: dict


def _load_run(args: argparse.Namespace, fitted_prior: bool = True) -> _Loaded:
    """Open ``args.run_dir``: refuse a foreign checkpoint or data of another shape, then load; with
    ``--prior pixelcnn`` the model runs under its fitted second-stage prior."""
    run = RunDir.open(args.run_dir)
    config = RunConfig.from_dict(run.config(), source=f"{run.path}/config.json")
    if _multistage(config):
        # A staged run: its newest stage that holds the checkpoint asked for.
        found = [
            path for _, path in _stage_dirs(run, config) if (path / f"{args.checkpoint}.pt").exists()
        ]
        if not found:
            raise FileNotFoundError(f"run_dir: no stage of {run.path} holds a {args.checkpoint}.pt yet")
        run = RunDir.open(found[-1])
        config = RunConfig.from_dict(run.config(), source=f"{run.path}/config.json")
    device = args.device or config.device
    _check_device(device)
    _check_selection(args)
    path = run.checkpoint(args.checkpoint)
    state = load_checkpoint(path)
    run.check_owns(state, path)
    if args.data is not None:
        config = replace(config, data=args.data)
    for name in ("ais_chains", "ais_steps"):
        if getattr(args, name, None) is not None:
            config = replace(config, **{name: getattr(args, name)})
    resolve_family(config)  # refuses settings the run's model does not take
    dataset = load_data(config)
    if list(dataset.image_shape) != state["image_shape"]:
        raise ValueError(
            f"--data: {config.data or config.dataset} holds images {tuple(dataset.image_shape)}, "
            f"but the run was trained on {tuple(state['image_shape'])}"
        )
    vae, family = build(config, dataset)
    try:
        vae.load_state_dict(state["model"])
        family.load_state_dict(state["family"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"checkpoint: {path} does not fit the model of {run.path}/config.json ({err})"
        ) from err
    if fitted_prior and getattr(args, "prior", "model") == "pixelcnn":
        vae = _fitted_priors(run, vae)
    vae.to(device)
    family.to(device)
    splits = {"valid": dataset.valid, "train": dataset.train}
    images = torch.cat([dataset.train, dataset.valid]) if args.split == "all" else splits[args.split]
    images, chosen = _select(args, images)
    report = {
        "run_dir": str(run.path),
        "checkpoint": args.checkpoint,
        "step": state["step"],
        "data": config.data or config.dataset,
        "split": args.split,
        "prior": getattr(args, "prior", "model"),
        **chosen,
    }
    return _Loaded(run, config, state, vae, family, vae.likelihood.prepare(images), report)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


PRIOR_SETTINGS = (
    "site", "context", "checkpoint", "hidden", "layers", "kernel", "batch_size", "lr", "seed",
)  # fmt: skip
"""What a fitted prior's directory records; a resumed fit must name the same."""


def _site(vae: nn.Module, name: str | None) -> CodeSite:
    """The code site called ``name``, or the model's first (its top layer)."""
    sites = {site.name: site for site in vae.code_sites}
    if name is None:
        return vae.code_sites[0]
    if name not in sites:
        raise ValueError(f"--site: expected one of the model's code sites {sorted(sites)}, got {name!r}")
    return sites[name]


def _pixelcnn(vae: nn.Module, settings: dict) -> GatedPixelCNN | UpperContext:
    """The PixelCNN a fitted prior's ``settings`` describe: over its site, reading the values of
    its ``context`` site (upsampled) if it names one."""
    site = _site(vae, settings["site"])
    upper = _site(vae, settings["context"]) if settings["context"] else None
    net = GatedPixelCNN(
        site.num_codes,
        site.space.value_shape.numel(),
        settings["hidden"],
        settings["layers"],
        settings["kernel"],
        context_channels=upper.space.value_shape.numel() if upper else 0,
    )
    return UpperContext(net, upper.name, site.grid) if upper else net


def fit_prior_command(args: argparse.Namespace) -> int:
    if args.limit is not None or args.subset is not None or args.split != "valid":
        raise ValueError(
            "--limit, --subset, --split: fit-prior reads the run's whole train and valid splits"
        )
    check_fit_settings(args.epochs, args.batch_size, args.lr)
    loaded = _load_run(args, fitted_prior=False)
    site = _site(loaded.vae, args.site)
    names = [s.name for s in loaded.vae.code_sites]
    context_site = None if args.context is None else _site(loaded.vae, args.context)
    if context_site is not None and names.index(context_site.name) >= names.index(site.name):
        raise ValueError(
            f"--context: {context_site.name!r} must be a layer above {site.name!r} (the model's "
            f"sites, top first: {', '.join(names)})"
        )
    settings = {name: getattr(args, name) for name in PRIOR_SETTINGS} | {"site": site.name}
    directory = loaded.run.path / f"prior-{site.name}"
    if (directory / "settings.json").exists():
        saved = json.loads((directory / "settings.json").read_text())
        if saved != settings:
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            raise ValueError(
                f"{directory} holds a prior fitted with other settings ({', '.join(changed)}); "
                "remove it to start again, or repeat its settings to resume"
            )
    directory.mkdir(exist_ok=True)
    write_json(directory / "settings.json", settings)
    codes_path = directory / "codes.pt"
    wanted = [site.name, *([args.context] if args.context else [])]
    if codes_path.exists():
        codes = load_checkpoint(codes_path)
    else:
        dataset = load_data(loaded.config)
        prepare = loaded.vae.likelihood.prepare
        codes = {
            split: extract_codes(loaded.vae, loaded.family, prepare(images), wanted, seed=args.seed,
                                 progress=_progress(args))
            for split, images in (("train", dataset.train), ("valid", dataset.valid))
        }  # fmt: skip
        save_checkpoint(codes_path, codes)
    torch.manual_seed(args.seed)
    prior = _pixelcnn(loaded.vae, settings).to(site.space.like.device)
    upper = None
    if context_site is not None:
        upper = (
            (context_site, codes["train"][context_site.name]),
            (context_site, codes["valid"][context_site.name]),
        )

    def log(record: dict) -> None:
        if not args.quiet:
            print(json.dumps(record), file=sys.stderr)

    history = fit_prior(
        prior, site, codes["train"][site.name], codes["valid"][site.name], args.epochs,
        directory / "prior.pt", upper, args.batch_size, args.lr, args.seed, _progress(args), log,
    )  # fmt: skip
    uniform = math.prod(site.grid) * math.log(site.num_codes)
    print(
        json.dumps(
            {**loaded.report, "prior": str(directory), "uniform_nll": uniform, "history": history}
        )
    )
    return 0


def _fitted_priors(run: RunDir, vae: nn.Module) -> WithPriors:
    """``vae`` with every PixelCNN that ``probvq fit-prior`` fitted in ``run`` at its site."""
    found = sorted(run.path.glob("prior-*/prior.pt"))
    if not found:
        raise FileNotFoundError(
            f"--prior pixelcnn: {run.path} holds no fitted prior (prior-<site>/prior.pt); first "
            f"run probvq fit-prior {run.path}"
        )
    priors = {}
    for path in found:
        settings = json.loads((path.parent / "settings.json").read_text())
        prior = _pixelcnn(vae, settings)
        prior.load_state_dict(load_checkpoint(path)["prior"])
        priors[settings["site"]] = prior
    return WithPriors(vae, priors)


def evaluate_command(args: argparse.Namespace) -> int:
    loaded = _load_run(args)
    summary = evaluate(
        loaded.vae,
        loaded.family,
        loaded.x,
        args.batch_size,
        args.seed,
        progress=_progress(args),
        collapse=not args.no_collapse,
    )
    print(json.dumps({**loaded.report, **summary}))
    return 0


def diagnose_command(args: argparse.Namespace) -> int:
    check_settings(args.k, args.memory_mib, args.batch_size)
    RunDir.check_new(args.out)
    records = RunDir.open(args.run_dir).read_log()  # a torn log fails here, not after the IWAE pass
    loaded = _load_run(args)
    found = diagnose(
        loaded.vae,
        loaded.family,
        loaded.x,
        k=args.k,
        memory_mib=args.memory_mib,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=_progress(args),
        keep_log_weights=args.save_log_weights,
        collapse=not args.no_collapse,
    )
    summary = {**loaded.report, **found.summary()}
    with new_directory(args.out) as out:  # all files or none: a failure leaves no partial directory
        export = to_inference_data(found, records, loaded.config.to_dict())
        write_netcdf(out / "diagnostics.nc", export)
        plots = write_plots(found, records, out / "plots")
        summary["files"] = ["diagnostics.nc", *(str(p.relative_to(out)) for p in plots)]
        write_json(out / "summary.json", summary)
    print(json.dumps(summary))
    return 0


def sample_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out: expected a .png file name, got {args.out!r}")
    if out.exists():
        raise ValueError(f"--out: {out} exists; choose a new file name (nothing is overwritten)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: no such directory: {out.parent}")
    if args.n < 1:
        raise ValueError(f"--n: expected a positive number of samples, got {args.n}")
    loaded = _load_run(args)
    sites = [site.name for site in loaded.vae.code_sites]
    layers = len(sites)
    keep: list[str] = []
    image = None
    if args.resample_from is not None:
        if not 0 <= args.resample_from <= layers:
            raise ValueError(
                f"--resample-from: expected a layer 0 to {layers} (the model's layers are "
                f"{', '.join(sites)}, top first), got {args.resample_from}"
            )
        if not 0 <= args.image < loaded.x.shape[0]:
            raise ValueError(f"--image: expected 0 to {loaded.x.shape[0] - 1}, got {args.image}")
        keep, image = sites[: layers - args.resample_from], loaded.x[args.image]
    shape = tuple(loaded.state["image_shape"])
    trace = ancestral_trace(loaded.vae, loaded.family, args.n, shape, args.seed, keep, image)
    samples = likelihood_mean(trace)
    title = "samples from the prior"
    if image is not None:
        samples = torch.cat([image.unsqueeze(0).cpu(), samples])
        title = f"first: {args.split} image {args.image}; then layers {', '.join(keep) or 'none'} kept"
    image_grid(samples, out, loaded.vae.likelihood.display_range, title)
    print(json.dumps({**loaded.report, "out": str(out), "n": args.n, "kept": keep, "seed": args.seed}))
    return 0


def _add_run_flags(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory written by probvq train")
    parser.add_argument("--data", help="dataset to use (default: the run's own data)")
    parser.add_argument(
        "--split", choices=("valid", "train", "all"), default="valid", help="which part of it"
    )
    parser.add_argument("--checkpoint", choices=("best", "final"), default="best")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="points per pass")
    parser.add_argument("--limit", type=int, help="use only the first N examples")
    parser.add_argument(
        "--subset",
        type=int,
        help="use N examples drawn at random (seeded by --seed; test splits are often sorted by class)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: the run's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    for name in ("ais_chains", "ais_steps"):
        parser.add_argument(_flag(name), type=int, help=f"{HELP[name]} (default: the run's)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probvq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model under a guide family")
    _add_config_flags(train)
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its newest good checkpoint"
    )
    train.set_defaults(handler=train_command)
    ev = commands.add_parser("evaluate", help="exact ELBO, surrogate gap and usage of a run")
    _add_run_flags(ev, batch_size=500)
    ev.set_defaults(handler=evaluate_command)
    diag = commands.add_parser(
        "diagnose",
        help="per-site ELBO terms, importance-weighted bound, PSIS k-hat, usage; JSON, netCDF, plots",
    )
    fit = commands.add_parser(
        "fit-prior", help="fit a gated PixelCNN to a run's codes (the second stage; resumable)"
    )
    _add_run_flags(fit, batch_size=64)
    fit.add_argument("--site", help="code site (default: the model's first, its top layer)")
    fit.add_argument(
        "--context", help="condition on the codes of this site above --site (upsampled to its grid)"
    )
    fit.add_argument("--epochs", type=int, default=20, help="passes over the training codes")
    fit.add_argument("--hidden", type=int, default=64, help="channels of the PixelCNN")
    fit.add_argument("--layers", type=int, default=8, help="gated layers")
    fit.add_argument("--kernel", type=int, default=5, help="odd kernel size")
    fit.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    fit.set_defaults(handler=fit_prior_command)
    for sub in (ev, diag):
        sub.add_argument(
            "--no-collapse",
            action="store_true",
            help="skip the layer-collapse scores (one more model pass per code site)",
        )
    _add_run_flags(diag, batch_size=500)
    diag.add_argument("--k", type=int, default=1000, help="importance samples per data point")
    diag.add_argument(
        "--memory-mib", type=float, default=256.0, help="peak memory cap of one pass, in MiB"
    )
    diag.add_argument(
        "--out", required=True, help="new directory for summary.json, diagnostics.nc, plots/"
    )
    diag.add_argument(
        "--save-log-weights", action="store_true", help="also store the (points x k) log-weights"
    )
    diag.set_defaults(handler=diagnose_command)
    sample = commands.add_parser(
        "sample", help="decode codes drawn top-down from the model's prior into an image grid"
    )
    _add_run_flags(sample, batch_size=500)
    sample.add_argument("--n", type=int, default=64, help="number of samples")
    sample.add_argument("--out", required=True, help="new .png file for the grid")
    sample.add_argument(
        "--resample-from",
        type=int,
        metavar="L",
        help="keep the exact posterior codes of --image for the layers above L, redraw the rest",
    )
    sample.add_argument("--image", type=int, default=0, help="index of the image (in --split)")
    sample.set_defaults(handler=sample_command)
    for sub in (ev, diag, sample):
        sub.add_argument(
            "--prior",
            choices=("model", "pixelcnn"),
            default="model",
            help="the model's own priors, or where probvq fit-prior fitted PixelCNNs, those",
        )
    return parser


# argparse reads "-1e-3" as an option, not as a negative number; admit exponents too.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    for sub in (parser, *parser._subparsers._group_actions[0].choices.values()):
        sub._negative_number_matcher = NEGATIVE_NUMBER
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FloatingPointError, WriteError) as err:
        print(f"probvq: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"probvq: error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 2
    except TrainingInterruptedError as err:
        print(f"probvq: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("probvq: interrupted", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
