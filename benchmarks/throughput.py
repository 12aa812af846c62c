"""Training throughput of the engine against the same network as a plain PyTorch loop.

For each model (today only ``vqvae`` exists; the deep hierarchy is a later issue), device and
precision, one process builds one model and copies it twice. probvq trains its copy with
:func:`probvq.inference.fit` itself: the whole engine, with its data order, per-site loss terms,
fault checks, hooks and the final (one-example) evaluation. The plain loop trains the other copy
with the same objective written by hand (``overhead.plain_step``: encoder, chunked nearest code,
straight-through, decoder, Bernoulli NLL + KL + VQ terms, clipping, Adam), on batches gathered
and moved to the device the same way. The two alternate in blocks of ``--steps`` steps; the ratio
of median images per second is reported (goal: probvq / plain >= 0.95). ``--precision bf16`` runs
both under bfloat16 autocast, ``--compile`` compiles both networks. Usage::

    python benchmarks/throughput.py [--device cpu cuda] [--precision fp32 bf16] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import pyro
import torch

from common import write_result
from overhead import plain_step
from probvq.config import RunConfig
from probvq.data import synthetic
from probvq.inference import VQ, fit
from probvq.likelihoods import Bernoulli
from probvq.models import VQVAE


def engine_block(vae, family, train_x, valid_x, settings: dict):
    """``steps`` engine steps as one ``fit`` call (a fresh optimiser each block, as a new run)."""

    def run() -> None:
        fit(vae, family, train_x, valid_x, RunConfig(family="vq", quiet=True, **settings))

    return run


def plain_block(vae, train_x, steps: int, batch_size: int, device, precision: str):
    optimiser = torch.optim.Adam(vae.parameters(), lr=1e-3)
    step = plain_step(vae, optimiser, beta=0.25)
    generator = torch.Generator().manual_seed(0)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    def run() -> None:
        order = torch.randperm(train_x.shape[0], generator=generator)
        for i in range(steps):
            x = train_x[order[i * batch_size : (i + 1) * batch_size]].to(device)
            with autocast:
                loss = step(x)
            loss.item()  # a loop that logs its loss waits for it, as the engine does

    return run


def measure(args, device: torch.device, precision: str) -> dict:
    pyro.set_rng_seed(args.seed)
    n = args.batch_size * args.steps
    train_x = synthetic(n_train=n, n_valid=1).train.float()
    base = VQVAE((1, 28, 28), Bernoulli(), args.num_codes, args.code_dim, 7, args.hidden)
    base.codebook.initialise(base.encoder(train_x[: args.batch_size]).detach().movedim(1, -1))
    engine_vae, plain_vae = copy.deepcopy(base), copy.deepcopy(base).to(device)
    family = VQ(engine_vae.code_sites)
    if args.compile:
        for net in (plain_vae.encoder, plain_vae.decoder):
            net.compile()
    settings = dict(
        max_steps=args.steps, eval_every=args.steps, checkpoint_every=args.steps,
        batch_size=args.batch_size, valid_size=1, device=str(device), precision=precision,
        compile=args.compile, num_codes=args.num_codes, code_dim=args.code_dim, hidden=args.hidden,
    )  # fmt: skip
    blocks = {
        "probvq": engine_block(engine_vae, family, train_x, train_x[:1], settings),
        "plain": plain_block(plain_vae, train_x, args.steps, args.batch_size, device, precision),
    }
    for run in blocks.values():  # warm-up: first-step validation, compilation, allocator
        run()
    seconds: dict[str, list[float]] = {name: [] for name in blocks}
    for block in range(args.blocks):
        order = list(blocks) if block % 2 == 0 else list(reversed(blocks))
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            blocks[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    images = {name: n / statistics.median(t) for name, t in seconds.items()}
    return {
        "model": "vqvae",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "compile": args.compile,
        "images_per_second": images,
        "ratio_probvq_over_plain": images["probvq"] / images["plain"],
        "block_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per loop")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--num-codes", type=int, default=64)
    parser.add_argument("--code-dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    runs, skipped = [], []
    for name in args.device:
        if name.startswith("cuda") and not torch.cuda.is_available():
            skipped.append(f"{name}: CUDA is not available")
            continue
        for precision in args.precision:
            if name == "cpu" and precision == "bf16":
                skipped.append("cpu bf16: autocast on the CPU is a correctness path, not a speed one")
                continue
            result = measure(args, torch.device(name), precision)
            runs.append(result)
            print(
                f"{name} {precision}{' compiled' if args.compile else ''}: probvq "
                f"{result['images_per_second']['probvq']:.0f} img/s, plain "
                f"{result['images_per_second']['plain']:.0f} img/s, "
                f"ratio {result['ratio_probvq_over_plain']:.3f}"
            )
    out = write_result(args.out, {"benchmark": "throughput", "runs": runs, "skipped": skipped,
                                  "settings": vars(args)})  # fmt: skip
    print(f"-> {out}; skipped: {skipped}")


if __name__ == "__main__":
    main()
