"""Cost of depth: training-step time and peak memory against the number of layers.

Each depth runs in a fresh process (so each peak resident size is its own). ``--model deep``: the
deep hierarchy with the study's per-layer settings (K = 32, D = 8, ``--hidden``, 7 x 7 grids) on
binary 28 x 28 batches, L = 1 ... 32. ``--model hqvae --kind injected|residual``: HQ-VAE stacks of
one kind on binary 32 x 32 batches, K = 64, D = 16; injected layers open 2 x 2, 4 x 4, 8 x 8,
16 x 16 in turn (so at most 4 of them), residual depths all quantise one 8 x 8 feature. The
family is ``--family`` (``rr`` by default), batches of ``--batch-size``; ``--warmup`` steps, then
the median of ``--steps`` timed steps (loss, backward, Adam, after-step hooks), as
:func:`probvq.inference.fit` does them.
Memory is the peak resident size over the baseline before the model is built (CPU), or the peak
allocated CUDA memory. A least-squares line ``t(L) = a + b L`` is fitted to the medians and its
R^2 reported: the cost should grow about linearly in L. Usage::

    python benchmarks/depth.py [--layers 1 2 4 8 16 32] [--device cpu] [--out results/depth-cpu.json]
    python benchmarks/depth.py --model hqvae --kind residual --layers 1 2 4 8 --family sq \
        --out benchmarks/results/hqvae-residual-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import pyro
import torch

from common import peak_rss_mib, run_child, write_result
from probvq.hooks import after_step, before_run
from probvq.inference import FAMILIES
from probvq.likelihoods import Bernoulli
from probvq.models import HQVAE, DeepVAE


def measure(layers: int, args: argparse.Namespace) -> dict:
    """Step time and peak memory of one depth (runs in the child process)."""
    device = torch.device(args.device)
    pyro.set_rng_seed(0)
    baseline = peak_rss_mib()
    if args.model == "deep":
        side = 28
        vae = DeepVAE((1, side, side), Bernoulli(), layers, args.levels, 32, 8, 7, args.hidden)
    else:
        side, grid = 32, 2 if args.kind == "injected" else 8
        vae = HQVAE((1, side, side), Bernoulli(), [args.kind] * layers, 64, 16, grid, args.hidden)
    vae = vae.to(device)
    family = FAMILIES[args.family].build(vae.code_sites).to(device)
    programs = family.wrap(vae.model, pyro_params=False), family.wrap(vae.guide, pyro_params=False)
    elbo = family.elbo(max_plate_nesting=1)
    parameters = [*vae.parameters(), *family.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=1e-3)
    before_run(args.warmup + args.steps, vae, family)
    x = (torch.rand(args.batch_size, 1, side, side) > 0.5).float().to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = elbo.differentiable_loss(*programs, x) / args.batch_size
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)
        optimiser.step()
        after_step(vae, family)
        float(loss)  # the engine reads the loss every step
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    memory = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else peak_rss_mib() - baseline
    )
    return {
        "layers": layers,
        "parameters": sum(p.numel() for p in parameters),
        "step_ms": 1000 * statistics.median(times),
        "peak_mib": memory,
    }


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares ``y = a + b x`` and its R^2."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    residual = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    total = sum((y - my) ** 2 for y in ys)
    return {"intercept": a, "slope_per_layer": b, "r2": 1 - residual / total if total else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--model", choices=("deep", "hqvae"), default="deep")
    parser.add_argument("--kind", choices=("injected", "residual"), default="residual")
    parser.add_argument("--family", default="rr")
    parser.add_argument("--levels", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/depth-cpu.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args)))
        return
    passed = sys.argv[1:]  # the child reads the same settings and writes nothing
    rows = []
    for layers in args.layers:
        row = run_child(__file__, [*passed, "--child", str(layers)])
        rows.append(row)
        print(
            f"L={layers:2d}  {row['parameters']:>9,d} parameters  {row['step_ms']:8.1f} ms/step  "
            f"{row['peak_mib']:8.1f} MiB"
        )
    layers = [r["layers"] for r in rows]
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "rows": rows,
        "time_fit": linear_fit(layers, [r["step_ms"] for r in rows]),
        "memory_fit": linear_fit(layers, [r["peak_mib"] for r in rows]),
    }
    print(json.dumps({k: result[k] for k in ("time_fit", "memory_fit")}))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
