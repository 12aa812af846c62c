"""The ``probvq`` command: ``train`` a model under a guide family, ``evaluate`` or ``diagnose`` a run.

Settings come from defaults, then ``--config FILE`` (TOML or JSON), then flags. Errors in the input
(missing files, bad data, bad settings) are reported in one line before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import typing
from dataclasses import fields, replace
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn

from probvq.build import build, load_data, resolve, resolve_family
from probvq.config import RunConfig, read_config_file
from probvq.inference import FAMILIES, RunDir, diagnose, evaluate, fit, load_checkpoint
from probvq.inference.diagnostics import check_settings
from probvq.inference.diagnostics.export import to_inference_data, write_netcdf
from probvq.inference.diagnostics.plots import write_plots
from probvq.inference.training.checkpoint import new_directory, write_json

HELP = {
    "model": "model to train (vqvae)",
    "num_codes": "codebook size K",
    "code_dim": "code dimension D",
    "grid": "side of the latent grid (image side / grid must be a power of two)",
    "hidden": "channels of the conv encoder and decoder",
    "res_blocks": "residual blocks in encoder and decoder",
    "likelihood": "auto, bernoulli, logistic (8-bit) or gaussian",
    "prior": "uniform or learned prior over codes",
    "codebook_init": "auto, normal, uniform, data or kmeans",
    "restart_threshold": "restart codes whose usage EMA falls below this (0: never)",
    "data": "dataset file or directory (.amat, .npz/.npy, MNIST idx, CIFAR-10 batches)",
    "dataset": "built-in dataset when --data is not given: synthetic or synthetic-rgb",
    "train_limit": "use only the first N training examples",
    "epochs": "passes over the training data",
    "max_steps": "stop after this many steps (or after --epochs, whichever comes first)",
    "batch_size": "examples per step",
    "lr": "Adam learning rate",
    "clip_norm": "global gradient-norm clip",
    "eval_every": "steps between validation evaluations (default: once per epoch)",
    "valid_size": "validation examples evaluated during training",
    "seed": "random seed",
    "device": "cpu or cuda",
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


def train_command(args: argparse.Namespace) -> int:
    config = resolve_family(config_from_args(args))
    _check_device(config.device)
    out = config.out or f"runs/{config.model}-{config.family}-{time.strftime('%Y%m%d-%H%M%S')}"
    RunDir.check_new(out)
    dataset = load_data(config)
    config = replace(resolve(config, dataset), out=str(out))
    pyro.set_rng_seed(config.seed)
    vae, family = build(config, dataset)
    run = RunDir.create(out, config.to_dict())
    prepare = vae.likelihood.prepare
    result = fit(vae, family, prepare(dataset.train), prepare(dataset.valid), config, run)
    summary = {
        "run_dir": str(run.path),
        "steps": result.steps,
        "best_step": result.best["step"],
        "best": result.best["valid"],
        "final": result.history[-1]["valid"],
    }
    write_json(run.path / "summary.json", summary)
    print(json.dumps(summary))
    return 0


def _load_run(args: argparse.Namespace) -> tuple[RunDir, RunConfig, dict, nn.Module, nn.Module, Tensor]:
    """The run, its config, checkpoint, model and family on the device, and the chosen data."""
    run = RunDir.open(args.run_dir)
    config = RunConfig.from_dict(run.config(), source=f"{run.path}/config.json")
    device = args.device or config.device
    _check_device(device)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: expected a positive integer, got {args.limit}")
    if args.data is not None:
        config = replace(config, data=args.data)
    dataset = load_data(config)
    vae, family = build(config, dataset)
    state = load_checkpoint(run.checkpoint(args.checkpoint))
    try:
        vae.load_state_dict(state["model"])
        family.load_state_dict(state["family"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"checkpoint: {run.checkpoint(args.checkpoint)} does not fit the model of "
            f"{run.path}/config.json on this data ({err})"
        ) from err
    vae.to(device)
    family.to(device)
    splits = {"valid": dataset.valid, "train": dataset.train}
    images = torch.cat([dataset.train, dataset.valid]) if args.split == "all" else splits[args.split]
    x = vae.likelihood.prepare(images[: args.limit])
    return run, config, state, vae, family, x


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _report(args: argparse.Namespace, run: RunDir, config: RunConfig, state: dict) -> dict:
    data = config.data or config.dataset
    return {
        "run_dir": str(run.path),
        "checkpoint": args.checkpoint,
        "step": state["step"],
        "data": data,
        "split": args.split,
    }


def evaluate_command(args: argparse.Namespace) -> int:
    run, config, state, vae, family, x = _load_run(args)
    summary = evaluate(vae, family, x, args.batch_size, args.seed, progress=_progress(args))
    print(json.dumps({**_report(args, run, config, state), **summary}))
    return 0


def diagnose_command(args: argparse.Namespace) -> int:
    check_settings(args.k, args.memory_mib, args.batch_size)
    RunDir.check_new(args.out)
    run, config, state, vae, family, x = _load_run(args)
    found = diagnose(
        vae,
        family,
        x,
        k=args.k,
        memory_mib=args.memory_mib,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=_progress(args),
        keep_log_weights=args.save_log_weights,
    )
    records = run.read_log()
    summary = {**_report(args, run, config, state), **found.summary()}
    with new_directory(args.out) as out:  # all files or none: a failure leaves no partial directory
        write_netcdf(out / "diagnostics.nc", to_inference_data(found, records, config.to_dict()))
        plots = write_plots(found, records, out / "plots")
        summary["files"] = ["diagnostics.nc", *(str(p.relative_to(out)) for p in plots)]
        write_json(out / "summary.json", summary)
    print(json.dumps(summary))
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: the run's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probvq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model under a guide family")
    _add_config_flags(train)
    train.set_defaults(handler=train_command)
    ev = commands.add_parser("evaluate", help="exact ELBO, surrogate gap and usage of a run")
    _add_run_flags(ev, batch_size=500)
    ev.set_defaults(handler=evaluate_command)
    diag = commands.add_parser(
        "diagnose",
        help="per-site ELBO terms, importance-weighted bound, PSIS k-hat, usage; JSON, netCDF, plots",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"probvq: error: {err}", file=sys.stderr)
        return 2
