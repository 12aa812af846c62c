"""Stochastic variational inference for a model/guide pair under a guide family.

Before the first step every module that takes the run's length hears it (``before_run``: relative
schedules). Each step draws a minibatch, evaluates the family's Pyro ELBO (``family.elbo()``,
:class:`~..objectives.elbo.CodeELBO` for the codebook and binary families) through its
``differentiable_loss``, clips the global gradient norm and takes an Adam step over the networks'
and the family's parameters; then every module's ``after_step`` hook runs (:mod:`probvq.hooks`): the
families commit codebook statistics (EMA, restarts) and advance their temperature schedules, and a
model's own state (e.g. persistent chains) moves on. Every
``eval_every`` steps the exact ELBO, surrogate gap and codebook perplexity are measured on a
validation slice, logged to ``metrics.jsonl``, and the best checkpoint (by exact ELBO) is kept.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from probvq.config import RunConfig
from probvq.hooks import after_step, before_run
from probvq.sites import DiscreteVAE

from ..objectives.evaluate import check_inputs, evaluate
from .checkpoint import RunDir, save_checkpoint

if TYPE_CHECKING:
    from ..families import FamilyStack, GuideFamily


@dataclass
class TrainResult:
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def _better(metrics: dict[str, Any], than: dict[str, Any]) -> bool:
    """A higher exact ELBO; NaN never wins."""
    new, old = metrics["exact_elbo"]["mean"], than["exact_elbo"]["mean"]
    return new > old or (math.isnan(old) and not math.isnan(new))


def _minibatches(n: int, batch_size: int, generator: torch.Generator):
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def fit(
    vae: DiscreteVAE,
    family: GuideFamily | FamilyStack,
    train_x: Tensor,
    valid_x: Tensor,
    config: RunConfig,
    run: RunDir | None = None,
) -> TrainResult:
    """Train ``vae`` under ``family`` on prepared data; returns the evaluation history.

    ``config`` supplies ``epochs``, ``max_steps``, ``batch_size``, ``lr``, ``clip_norm``,
    ``eval_every``, ``valid_size``, ``seed``, ``device`` and ``quiet``.
    """
    if not isinstance(vae, nn.Module):
        raise TypeError(f"vae: expected an nn.Module with model/guide, got {type(vae).__name__}")
    check_inputs(vae, train_x, "train_x")
    check_inputs(vae, valid_x, "valid_x")
    device = torch.device(config.device)
    vae.to(device)
    family.to(device)
    pyro.set_rng_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, train_x.shape[0])
    steps_per_epoch = max(1, train_x.shape[0] // batch_size)
    total = config.epochs * steps_per_epoch
    total = min(total, config.max_steps) if config.max_steps else total
    eval_every = config.eval_every or steps_per_epoch
    valid = valid_x[: config.valid_size]

    parameters = [p for m in (vae, family) for p in m.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=config.lr)
    loss_fn = family.elbo(max_plate_nesting=1).differentiable_loss
    model, guide = family.wrap(vae.model, pyro_params=False), family.wrap(vae.guide, pyro_params=False)
    result = TrainResult()
    window: list[float] = []
    started = time.perf_counter()
    bar = tqdm(
        total=total,
        desc=f"train {type(vae).__name__.lower()}/{family.name}",
        disable=config.quiet or not sys.stderr.isatty(),
    )
    vae.train()
    family.train()
    before_run(total, vae, family)
    batches = _minibatches(train_x.shape[0], batch_size, generator)
    for step in range(1, total + 1):
        x = train_x[next(batches)].to(device)
        loss = loss_fn(model, guide, x) / x.shape[0]
        if not torch.isfinite(loss):
            bar.close()
            raise FloatingPointError(
                f"training diverged at step {step} (loss {float(loss)}); lower --lr or --clip-norm"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, config.clip_norm)
        optimiser.step()
        after_step(vae, family)
        window.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{sum(window[-50:]) / len(window[-50:]):.2f}")
        if step % eval_every and step != total:
            continue
        metrics = evaluate(vae, family, valid, batch_size=max(batch_size, 256), seed=config.seed)
        record = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "loss": sum(window) / len(window),
            "temperature": getattr(family, "temperature", None),
            "seconds": time.perf_counter() - started,
            "valid": metrics,
        }
        window = []
        result.history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.2f}", exact=f"{metrics['exact_elbo']['mean']:.2f}")
        improved = result.best is None or _better(metrics, result.best["valid"])
        if improved:
            result.best = record
        if run is not None:
            run.log(record)
            state = {
                "model": vae.state_dict(),
                "family": family.state_dict(),
                "optimizer": optimiser.state_dict(),
                "step": step,
                "config": config.to_dict(),
                "metrics": record,
            }
            if improved:
                save_checkpoint(run.checkpoint("best"), state)
            if step == total:
                save_checkpoint(run.checkpoint("final"), state)
    bar.close()
    result.steps = total
    return result
