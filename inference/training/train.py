"""Stochastic variational inference for a model/guide pair under a guide family: the engine.

**A step.** Draw the next global batch (:class:`.state.DataOrder`), evaluate the family's Pyro ELBO
split by site (``family.elbo().differentiable_terms``; :class:`~..objectives.elbo.CodeELBO` for
the codebook and binary families), backpropagate, clip the global gradient norm and take an Adam
step over the networks' and the family's parameters; then every module's ``after_step`` hook runs
(:mod:`probvq.hooks`): families commit codebook statistics and advance temperature schedules, a
model's own state (e.g. persistent chains) moves on. Every ``eval_every`` steps the exact ELBO,
surrogate gap and perplexity are measured on a validation slice and logged to ``metrics.jsonl``;
the best checkpoint by exact ELBO is kept.

**Faults.** A step whose loss or gradient is not finite is skipped: no optimiser step, and the
statistics it observed are discarded (``discard_step`` hooks). It is logged to ``faults.jsonl`` and
stderr with the sites whose loss terms, or the parameters whose gradients, were not finite. After
``max_bad_steps`` consecutive such steps the run stops (:class:`DivergenceError`), keeping its
last good checkpoint. With ``skip_spikes``, a finite step whose gradient norm exceeds that factor
times the median of the last 100 is skipped and logged the same way (kind ``"spike"``), without
counting towards the streak.

**Objective.** The rate (every latent and prior-factor site) is weighted by ``beta_t`` rising
linearly to 1 over ``kl_warmup`` steps (:class:`probvq.warmup.RateScale`), and ``free_bits`` floors
each latent's batch-averaged rate (:class:`~..objectives.elbo.CodeELBO`). The training terms of every
site, averaged since the last evaluation, go into its record with ``beta``.

**Checkpoints and resume.** Every ``checkpoint_every`` steps and at the end, ``last.pt`` holds the
model, family and optimiser states (schedules and hook state are module buffers), the random states
of every rank (:mod:`.state`), the data order and its position, the step, and the history so far.
``fit(..., resume=state)`` continues from such a checkpoint; on the CPU the result is bitwise the
one of an uninterrupted run. SIGINT and SIGTERM end the current step, save ``last.pt`` and raise
:class:`TrainingInterruptedError`; a second signal stops at once.

**Data parallel.** Under ``torchrun`` (a process group initialised by the caller) each rank takes
its slice of every global batch, DistributedDataParallel averages the gradients, codebooks
all-reduce their statistics (:mod:`probvq.distributed`), ranks agree on skipping and stopping,
and only the rank given a run directory (rank 0) evaluates and writes.

**Speed.** ``precision="bf16"`` runs the programs under bfloat16 autocast (distances, softmaxes
over codes, KLs, likelihoods and codebook updates stay in float32: see the codebook, families and
likelihoods); ``compile=True`` compiles the model's networks (``nn.Module.compile``, so state-dict
keys do not change); on CUDA, batches are gathered into pinned memory and copied asynchronously.
"""

from __future__ import annotations

import inspect
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from probvq import distributed
from probvq.config import RunConfig
from probvq.hooks import after_step, before_run, discard_step
from probvq.sites import CodeGroup, CodeSite, DiscreteVAE
from probvq.spaces import CodeSpace
from probvq.warmup import RateScale, warmup_weight

from ..objectives.evaluate import check_inputs, evaluate
from .checkpoint import RunDir, save_checkpoint
from .state import DataOrder, rng_state, set_rng_state

if TYPE_CHECKING:
    from ..families import FamilyStack, GuideFamily


_DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters


class TrainingInterruptedError(Exception):
    """Training stopped by a signal after saving its checkpoint (the message says how to resume)."""


class DivergenceError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    faults: list[dict[str, Any]] = field(default_factory=list)


def _better(metrics: dict[str, Any], than: dict[str, Any]) -> bool:
    """A higher exact ELBO; NaN never wins."""
    new, old = metrics["exact_elbo"]["mean"], than["exact_elbo"]["mean"]
    return new > old or (math.isnan(old) and not math.isnan(new))


class _Objective(nn.Module):
    """The per-example negative ELBO split by kind and site, as a module so DDP can hook its
    backward; the rate is weighted by :attr:`warmup`'s ``beta``."""

    def __init__(self, vae: nn.Module, family: GuideFamily | FamilyStack, free_bits: float) -> None:
        super().__init__()
        self.vae, self.family = vae, family
        elbo = family.elbo(max_plate_nesting=1, **({"free_bits": free_bits} if free_bits else {}))
        self.parts = getattr(elbo, "differentiable_parts", None)
        self.loss = elbo.differentiable_loss
        self.warmup = RateScale()
        self.programs = (
            self.warmup(family.wrap(vae.model, pyro_params=False)),
            self.warmup(family.wrap(vae.guide, pyro_params=False)),
        )

    def forward(self, x: Tensor) -> dict[str, dict[str, Tensor]]:
        if self.parts is None:
            return {"loss": {"loss": self.loss(*self.programs, x) / x.shape[0]}}
        parts = self.parts(*self.programs, x)
        return {kind: {n: v / x.shape[0] for n, v in found.items()} for kind, found in parts.items()}


def _flatten(parts: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """``{"kind/name": value}`` in a fixed order."""
    return {f"{kind}/{name}": value for kind, found in parts.items() for name, value in found.items()}


class _Signals:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second one stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _compile_networks(vae: nn.Module) -> None:
    """Compile each child of ``vae`` that holds no code site or space (its networks), in place."""
    for child in vae.children():
        if not any(isinstance(m, CodeSite | CodeGroup | CodeSpace) for m in child.modules()):
            child.compile()


def _non_finite(named: list[tuple[str, nn.Parameter]]) -> list[str]:
    return [name for name, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]


def _describe(fault: dict[str, Any]) -> str:
    where = ", ".join(repr(name) for name in fault["where"]) or "unknown"
    if fault["kind"] == "loss":
        return f"loss {fault['loss']} at site {where}"
    if fault["kind"] == "spike":
        return f"gradient norm {fault['norm']:.4g} above {fault['threshold']:.4g} (a spike)"
    return f"non-finite gradient of {where}"


@dataclass
class _Progress:
    """The run's record so far; saved with every checkpoint."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    faults: list[dict[str, Any]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    term_sums: dict[str, float] = field(default_factory=dict)
    bad_in_row: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


SPIKE_WINDOW = 100
"""Recent steps whose (finite) gradient norms set the spike threshold: their median."""


def _spike_threshold(norms: list[float], factor: float | None) -> float:
    """``factor`` times the median of the recent gradient norms; infinite until 20 are known.

    The window holds skipped steps' norms too, so the threshold follows a lasting rise (on
    binarized MNIST the norm grows tenfold within 100 steps when a collapsed hierarchy starts using
    its codes) and only isolated spikes are skipped.
    """
    if factor is None or len(norms) < 20:
        return math.inf
    return factor * sorted(norms)[len(norms) // 2]


def _mean_terms(sums: dict[str, Tensor], steps: int) -> dict[str, dict[str, float]]:
    """The per-site training terms averaged over ``steps``, by kind: ``{"rate": {"z1": ...}}``."""
    found: dict[str, dict[str, float]] = {}
    for key, value in sums.items():
        kind, name = key.split("/", 1)
        found.setdefault(kind, {})[name] = float(value) / steps
    return found


def fit(
    vae: DiscreteVAE,
    family: GuideFamily | FamilyStack,
    train_x: Tensor,
    valid_x: Tensor,
    config: RunConfig,
    run: RunDir | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``vae`` under ``family`` on prepared data; returns the evaluation history.

    ``config`` supplies the training settings (``epochs``, ``max_steps``, ``batch_size``, ``lr``,
    ``clip_norm``, ``skip_spikes``, ``kl_warmup``, ``free_bits``, ``eval_every``, ``valid_size``,
    ``checkpoint_every``, ``max_bad_steps``,
    ``seed``, ``device``, ``precision``, ``compile``, ``quiet``). With ``run``, metrics, faults and
    checkpoints are written there; ``resume`` is a checkpoint of that run to continue from.
    """
    if not isinstance(vae, nn.Module):
        raise TypeError(f"vae: expected an nn.Module with model/guide, got {type(vae).__name__}")
    check_inputs(vae, train_x, "train_x")
    check_inputs(vae, valid_x, "valid_x")
    ranks, rank = distributed.world_size(), distributed.rank()
    batch_size = min(config.batch_size, train_x.shape[0])
    if batch_size % ranks:
        raise ValueError(f"batch_size: {batch_size} does not split evenly over {ranks} processes")
    device = torch.device(config.device)
    vae.to(device)
    family.to(device)
    pyro.set_rng_seed(config.seed + rank)
    order = DataOrder(train_x.shape[0], batch_size, config.seed)
    steps_per_epoch = train_x.shape[0] // batch_size
    total = config.epochs * steps_per_epoch
    total = min(total, config.max_steps) if config.max_steps else total
    eval_every = config.eval_every or steps_per_epoch
    valid = valid_x[: config.valid_size]

    objective = _Objective(vae, family, config.free_bits)
    named = [(f"{prefix}.{n}", p) for prefix, m in (("model", vae), ("family", family))
             for n, p in m.named_parameters()]  # fmt: skip
    parameters = [p for _, p in named]
    optimiser = torch.optim.Adam(parameters, lr=config.lr)
    progress, start = _Progress(), 0
    if resume is not None:
        vae.load_state_dict(resume["model"])
        family.load_state_dict(resume["family"])
        optimiser.load_state_dict(resume["optimizer"])
        order.load_state_dict(resume["data"])
        if len(resume["rng"]) != ranks:
            raise ValueError(
                f"--resume: the checkpoint was written by {len(resume['rng'])} processes, this run "
                f"has {ranks}; resume with the same number"
            )
        set_rng_state(resume["rng"][rank])
        progress, start = _Progress(**resume["progress"]), int(resume["step"])
    if config.compile:
        _compile_networks(vae)
    step_fn = objective
    if distributed.active():
        # Size-1 dimensions give a gradient other strides than its bucket view: harmless here.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # Codebook buffers are broadcast once, at construction; afterwards they stay equal through
        # their all-reduced statistics. The graph is static: every step runs the same sites.
        sync = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_OPTIONS else "broadcast_buffers"
        step_fn = DistributedDataParallel(objective, static_graph=True, **{sync: False})
    main = distributed.is_main()
    shard = slice(rank * batch_size // ranks, (rank + 1) * batch_size // ranks)
    rows = (shard.stop - shard.start, *train_x.shape[1:])
    pinned = device.type == "cuda" and train_x.device.type == "cpu"
    staging = torch.empty(rows, dtype=train_x.dtype, pin_memory=True) if pinned else None

    def checkpoint(step: int, names: tuple[str, ...]) -> None:
        """Write ``names``; ``last`` is a collective (it holds every rank's random state)."""
        states: list[Any] = [rng_state()]
        if "last" in names and distributed.active():
            states = [None] * ranks
            dist.all_gather_object(states, rng_state())
        if run is None:
            return
        keep_sums()
        state = {
            "run_id": run.run_id,
            "config": run.config(),
            "image_shape": list(train_x.shape[1:]),
            "model": vae.state_dict(),
            "family": family.state_dict(),
            "optimizer": optimiser.state_dict(),
            "step": step,
            "total_steps": total,
            "rng": states,
            "data": order.state_dict(),
            "progress": {
                **progress.to_dict(),
                "seconds": elapsed(),
            },
            "metrics": progress.history[-1] if progress.history else None,
        }
        for name in names:
            run.save(name, state) if name == "last" else save_checkpoint(run.checkpoint(name), state)

    # A module may say what the loss leaves out (an energy prior's log Z): bar and log repeat it.
    notes = sorted({note for m in vae.modules() if (note := getattr(m, "loss_note", None))})
    bar = tqdm(
        total=total,
        initial=start,
        desc=f"train {type(vae).__name__.lower()}/{family.name}"
        + (f" (loss: -{', '.join(notes)})" if notes else ""),
        disable=config.quiet or not sys.stderr.isatty() or not main,
    )
    vae.train()
    family.train()
    before_run(total, vae, family)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    began = time.perf_counter()

    def elapsed() -> float:
        return progress.seconds + time.perf_counter() - began

    # Per-site training terms of the accepted steps since the last record, summed on the device
    # (float64, so a resumed run continues the sums exactly).
    sums = {name: torch.tensor(value, dtype=torch.float64, device=device)
            for name, value in progress.term_sums.items()}  # fmt: skip

    def keep_sums() -> None:
        progress.term_sums = {name: float(value) for name, value in sums.items()}

    saved_at = start
    with _Signals() as signals:
        for step in range(start + 1, total + 1):
            index = order.next()[shard]
            if staging is not None:
                # The copy below is consumed before the next step refills the buffer: every step
                # waits for its loss on the host.
                x = torch.index_select(train_x, 0, index, out=staging).to(device, non_blocking=True)
            else:
                x = train_x[index].to(device)
            # Pyro validates distributions on the first step (shape and support errors surface
            # there); afterwards a NaN must reach the loss terms, where the step is skipped.
            objective.warmup.beta = warmup_weight(step, config.kl_warmup)
            with autocast, pyro.validation_enabled(step == start + 1):
                parts = step_fn(x)
            terms = _flatten(parts)
            loss = sum(terms.values())
            rate = sum(parts.get("rate", {}).values(), torch.zeros((), device=device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in parameters if p.grad is not None]
            norm = nn.utils.get_total_norm(grads)
            # One read from the device per step: loss, gradient norm and stop flag, summed over
            # ranks (the norm is equal on every rank, and a NaN on any rank stays NaN).
            stopping = torch.tensor(float(signals.received is not None), device=device)
            status = torch.stack(
                [loss.detach().double(), norm.double(), stopping.double(), rate.detach().double()]
            )
            distributed.all_reduce_sum(status)
            loss_sum, norm_sum, stops, rate_sum = status.tolist()
            loss_value = loss_sum / ranks
            threshold = _spike_threshold(progress.norms, config.skip_spikes)
            fault = None
            if not (math.isfinite(loss_sum) and math.isfinite(norm_sum)):
                names = [n.split("/", 1)[1] for n, v in terms.items() if not torch.isfinite(v)]
                fault = {"step": step, "kind": "loss" if names else "gradient", "loss": loss_value,
                         "where": names or _non_finite(named)}  # fmt: skip
            elif norm_sum / ranks > threshold:
                fault = {"step": step, "kind": "spike", "loss": loss_value, "where": [],
                         "norm": norm_sum / ranks, "threshold": threshold}  # fmt: skip
            if math.isfinite(norm_sum):
                # Skipped spikes count too: a lasting rise in the norm (a layer waking up) lifts
                # the median within half a window, and the steps go through again.
                progress.norms = [*progress.norms[-(SPIKE_WINDOW - 1) :], norm_sum / ranks]
            if fault is not None:
                discard_step(vae, family)
                progress.faults.append(fault)
                # A spike is finite and passes: only non-finite steps make a streak.
                progress.bad_in_row += fault["kind"] != "spike"
                if run is not None:
                    run.log(fault, "faults")
                if main:
                    tqdm.write(
                        f"probvq: warning: step {step} skipped: {_describe(fault)}", file=sys.stderr
                    )
                if progress.bad_in_row >= config.max_bad_steps:
                    bar.close()
                    kept = f"{run.checkpoint('last')} (step {saved_at})" if run and saved_at else None
                    raise DivergenceError(
                        f"training stopped at step {step}: {progress.bad_in_row} consecutive steps "
                        f"with a non-finite loss or gradient (last: {_describe(fault)}); "
                        + (f"the last good checkpoint is {kept}; " if kept else "")
                        + "lower --lr or --clip-norm, or raise --max-bad-steps"
                    )
            else:
                nn.utils.clip_grads_with_norm_(parameters, config.clip_norm, norm)
                optimiser.step()
                after_step(vae, family)
                progress.bad_in_row = 0
                progress.window.append(loss_value)
                progress.rates.append(rate_sum / ranks)
                for name, value in terms.items():
                    value = value.detach().double()
                    sums[name] = sums[name] + value if name in sums else value
            bar.update()
            if progress.window:
                recent, rates = progress.window[-50:], progress.rates[-50:]
                bar.set_postfix(
                    loss=f"{sum(recent) / len(recent):.2f}", rate=f"{sum(rates) / len(rates):.2f}"
                )
            if main and (step % eval_every == 0 or step == total):
                metrics = evaluate(vae, family, valid, max(batch_size, 256), config.seed, collapse=False)
                window, rates = progress.window or [math.nan], progress.rates or [math.nan]
                record = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": sum(window) / len(window),
                    **({"loss_is": f"-({', '.join(notes)})"} if notes else {}),
                    "rate": sum(rates) / len(rates),
                    "terms": _mean_terms(sums, len(progress.window)),
                    "beta": objective.warmup.beta,
                    "temperature": getattr(family, "temperature", None),
                    "seconds": elapsed(),
                    "valid": metrics,
                }
                progress.window, progress.rates, sums = [], [], {}
                progress.history.append(record)
                if run is not None:
                    run.log(record)
                improved = progress.best is None or _better(metrics, progress.best["valid"])
                if improved:
                    progress.best = record
                bar.set_postfix(
                    loss=f"{record['loss']:.2f}",
                    rate=f"{record['rate']:.2f}",
                    exact=f"{metrics['exact_elbo']['mean']:.2f}",
                    ppl="/".join(f"{p:.0f}" for p in metrics["perplexity"].values()),
                )
                if improved:
                    checkpoint(step, ("best",))
            # One process reads its own flag now; ranks act on the flag they agreed on this step.
            stop = stops > 0 if distributed.active() else signals.received is not None
            interrupted = stop and step < total
            # Within a streak of skipped steps the last checkpoint stays the last good one.
            periodic = step % config.checkpoint_every == 0 and progress.bad_in_row == 0
            if periodic or step == total or interrupted:
                checkpoint(step, ("last", "final") if step == total else ("last",))
                saved_at = step
            if interrupted:
                bar.close()
                where = f"saved {run.checkpoint('last')}" if run else "nothing saved (no run directory)"
                raise TrainingInterruptedError(
                    f"interrupted ({signals.received or 'signal on another rank'}) at step {step}; "
                    f"{where}; continue with: probvq train --resume {run.path if run else 'RUN_DIR'}"
                )
    bar.close()
    return TrainResult(steps=total, history=progress.history, best=progress.best, faults=progress.faults)
