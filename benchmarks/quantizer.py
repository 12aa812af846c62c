"""One ``vq`` site, forward+backward: probvq against a bare PyTorch floor and vector-quantize-pytorch.

For each configuration (N rows, code dimension D, K codes) and each implementation, a fresh child
process builds a K x D codebook and features ``z`` (N, D) that require grad (the same numbers for every
implementation: one seed), then times whole training passes of the quantiser: nearest-code search,
straight-through value, the codebook and commitment terms, and ``backward``. The downstream network is
stood in for by a fixed random tensor ``g``: each pass minimises ``sum(value * g) + penalty``, so the
gradient reaching ``z`` and the codebook is that of a real step, without a decoder's cost.

* ``probvq``: a :class:`probvq.CodeSite` over a :class:`probvq.Codebook` (``init="normal"``, so no
  k-means on the first batch) with its grid holding the rows (``--images`` data points of N / images
  positions each), a one-statement Pyro guide ``probvq.code(site, uniform logits, features=z)`` under
  the ``vq`` family built from the registry with its defaults (``beta = 0.25``, codebook learnt by the
  codebook loss, not EMA), traced with ``pyro.poutine.trace``; the loss adds the value's probe term to
  the guide's regulariser sites (the commitment and codebook terms, read as the ELBO reads them).
* ``floor``: the same computation in bare PyTorch: chunked-matmul argmin (``||e||^2 - 2 z.e`` over
  chunks of codes, the same element budget as probvq's codebook, never the N x K matrix),
  ``z + sg(e - z)``, ``beta ||z - sg(e)||^2 + ||sg(z) - e||^2``, backward.
* ``vqpytorch``: ``vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K)`` set to match
  probvq's default: a learnable codebook trained by gradient (``learnable_codebook=True,
  ema_update=False``), a plain straight-through estimator (``rotation_trick=False``), no dead-code
  replacement, no k-means init; its loss is ``mse(quantize, z)`` with gradient to both sides
  (``commitment_weight=1``). It is the optional ``bench`` extra (``pip install -e '.[bench]'``) and
  is skipped, and recorded as skipped, when it is not installed.

Reported per (implementation, config): the median of ``--repeats`` timed passes after ``--warmup``
passes (ms per forward+backward, and rows per second), and peak memory: on the CPU the growth of the
child's peak resident size (``ru_maxrss``) over the process after setup; on CUDA the peak of
``torch.cuda.max_memory_allocated`` over what was allocated after setup, with the clock read between
``torch.cuda.synchronize()`` calls. Ratios are probvq over the floor and over vector-quantize-pytorch.

Each child on the CPU runs under an address-space limit (``--memory-limit-gib``, default 12 GiB; 0
turns it off; off by default on CUDA, whose driver reserves address space it never touches), so a
configuration that needs more memory fails with an allocation error instead of swapping or waking the
kernel's OOM killer. A child that runs out of memory, fails, or is killed is recorded as such
(``{"status": "out of memory", "error": ...}``) and the benchmark goes on. Usage::

    python benchmarks/quantizer.py [--device cpu|cuda] [--repeats 5] [--warmup 2]
        [--configs 16384x64x512 16384x64x8192 16384x64x65536] [--impls probvq floor vqpytorch]
        [--memory-limit-gib 12] [--out benchmarks/results/quantizer-<device>.json]

Develop with small configurations, e.g. ``--configs 1024x16x64 --repeats 2``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import peak_rss_mib, run_child, write_result

IMPLEMENTATIONS = ("probvq", "floor", "vqpytorch")
CONFIGS = ("16384x64x512", "16384x64x8192", "16384x64x65536")
BETA = 0.25
"""Commitment weight of the floor: the ``vq`` family's default (the probvq child checks it)."""
CHUNK_ELEMENTS = 2**24
"""Element budget of one chunk of the floor's search: :class:`probvq.Codebook`'s default."""
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")

Step = Callable[[], torch.Tensor]
"""One forward+backward pass; returns the chosen code indices."""


def parse_config(text: str) -> tuple[int, int, int]:
    """``"NxDxK"`` as ``(N, D, K)``."""
    try:
        n, d, k = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a configuration NxDxK, got {text!r}") from None
    if min(n, d, k) < 1 or k < 2:
        raise argparse.ArgumentTypeError(f"expected N, D >= 1 and K >= 2, got {text!r}")
    return n, d, k


def limit_address_space(gib: float) -> None:
    """Cap this process's address space at ``gib`` GiB (0: no cap)."""
    if gib <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(gib * 2**30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def address_space_mib() -> float | None:
    """This process's current virtual size (``VmSize``), in MiB, where /proc says."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# -- the three implementations, each a step over the same z, codebook and probe --------------------


def build_probvq(z: torch.Tensor, weight: torch.Tensor, probe: torch.Tensor, images: int):
    import pyro

    from probvq import DATA_PLATE, Codebook, CodeSite, code
    from probvq.factors import REGULARISER
    from probvq.inference import FAMILIES

    n, d = z.shape
    book = Codebook(weight.shape[0], d, init="normal").to(z.device)
    with torch.no_grad():
        book.weight.copy_(weight)
    site = CodeSite("z", book, (n // images,))
    family = FAMILIES["vq"].build([site])
    family.train()
    if family.beta != BETA or family.ema:
        raise RuntimeError(f"vq defaults changed (beta {family.beta}, ema {family.ema}): update BETA")
    features = z.view(images, n // images, d)
    probe = probe.view_as(features)

    def guide(features: torch.Tensor) -> torch.Tensor:
        with pyro.plate(DATA_PLATE, features.shape[0]):
            return code(site, site.uniform_logits(features.shape[:1]), features=features)

    wrapped = family.wrap(guide, pyro_params=False)

    def step() -> torch.Tensor:
        trace = pyro.poutine.trace(wrapped).get_trace(features)
        value = trace.nodes["_RETURN"]["value"]
        penalty = sum(
            node["fn"].log_prob(node["value"]).sum()
            for node in trace.nodes.values()
            if node["type"] == "sample" and node["infer"].get(REGULARISER)
        )
        ((value * probe).sum() + penalty).backward()
        family.after_step()
        return book.index_of(trace.nodes["z"]["value"])

    settings = {
        "family": "vq (registry defaults)",
        "beta": family.beta,
        "ema": family.ema,
        "codebook": "learnt by the codebook loss ||sg(z) - e||^2 (vq default, ema=False)",
        "codebook_init": "normal (the registry default 'kmeans' runs once, on the first batch)",
        "chunk_elements": book.chunk_elements,
        "grid": [n // images],
        "data_points": images,
    }
    return step, [z, book.weight], settings


def chunked_nearest(z: torch.Tensor, weight: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """``argmin_k ||z - e_k||^2`` over chunks of codes, never holding the N x K matrix."""
    best = torch.full((z.shape[0],), math.inf, dtype=z.dtype, device=z.device)
    index = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    step = max(1, chunk_elements // max(z.shape[0], 1))
    for start in range(0, weight.shape[0], step):
        codes = weight[start : start + step]
        value, arg = torch.addmm(codes.pow(2).sum(-1), z, codes.T, alpha=-2.0).min(-1)
        better = value < best
        best = torch.where(better, value, best)
        index = torch.where(better, arg + start, index)
    return index


def build_floor(z: torch.Tensor, weight: torch.Tensor, probe: torch.Tensor, images: int):
    weight = weight.clone().requires_grad_()

    def step() -> torch.Tensor:
        with torch.no_grad():
            index = chunked_nearest(z, weight, CHUNK_ELEMENTS)
        e = torch.nn.functional.embedding(index, weight)
        value = z + (e - z).detach()
        penalty = BETA * (z - e.detach()).pow(2).sum() + (z.detach() - e).pow(2).sum()
        ((value * probe).sum() + penalty).backward()
        return index

    settings = {"beta": BETA, "chunk_elements": CHUNK_ELEMENTS, "codebook": "learnt by gradient"}
    return step, [z, weight], settings


VQPYTORCH_SETTINGS = {
    "learnable_codebook": True,
    "ema_update": False,
    "rotation_trick": False,
    "commitment_weight": 1.0,
    "threshold_ema_dead_code": 0,
    "kmeans_init": False,
}


def build_vqpytorch(z: torch.Tensor, weight: torch.Tensor, probe: torch.Tensor, images: int):
    from vector_quantize_pytorch import VectorQuantize

    n, d = z.shape
    vq = VectorQuantize(dim=d, codebook_size=weight.shape[0], **VQPYTORCH_SETTINGS).to(z.device)
    vq.train()
    embed = vq._codebook.embed
    with torch.no_grad():
        embed.copy_(weight.view_as(embed))
    x = z.view(images, n // images, d)
    probe = probe.view_as(x)

    def step() -> torch.Tensor:
        quantize, index, loss = vq(x)
        ((quantize * probe).sum() + loss.sum()).backward()
        return index

    settings = {
        **VQPYTORCH_SETTINGS,
        "version": importlib.metadata.version("vector-quantize-pytorch"),
        "input_shape": list(x.shape),
        "loss": "mse(quantize, z) (mean), gradient to both z and the codebook",
    }
    return step, [z, embed], settings


BUILDERS = {"probvq": build_probvq, "floor": build_floor, "vqpytorch": build_vqpytorch}


# -- one measurement, in a child process ------------------------------------------------------------


def measure(impl: str, config: tuple[int, int, int], args: argparse.Namespace) -> dict:
    n, d, k = config
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    images = args.images if n % args.images == 0 else 1
    torch.manual_seed(args.seed)
    weight, z, probe = torch.randn(k, d), torch.randn(n, d), torch.randn(n, d)
    weight, probe = weight.to(device), probe.to(device)
    z = z.to(device).requires_grad_()
    step, parameters, settings = BUILDERS[impl](z, weight, probe, images)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    base_rss = peak_rss_mib()
    base_cuda = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for i in range(args.warmup + args.repeats):
        for parameter in parameters:
            parameter.grad = None
        sync()
        start = time.perf_counter()
        index = step()
        sync()
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    result = {
        "status": "ok",
        "ms": 1e3 * median,
        "ms_min": 1e3 * min(seconds),
        "ms_all": [1e3 * s for s in seconds],
        "rows_per_second": n / median,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_extra_mib": peak_rss_mib() - base_rss,
        "checksum": int(index.reshape(-1)[:1000].sum()),
        "grad_norm_z": float(z.grad.norm()),
        "settings": settings,
    }
    if cuda:
        result["peak_cuda_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
        result["peak_memory_mib"] = result["peak_cuda_extra_mib"]
        result["peak_memory_measure"] = "torch.cuda.max_memory_allocated over setup"
    else:
        result["peak_memory_mib"] = result["peak_rss_extra_mib"]
        result["peak_memory_measure"] = "peak resident size (ru_maxrss) over setup"
    return result


def run_measurement(impl: str, config: tuple[int, int, int], args: argparse.Namespace) -> dict:
    """:func:`measure`, with running out of memory (or any failure) as a result, not a crash."""
    limit_address_space(args.memory_limit_gib)
    start_vm = address_space_mib()
    try:
        result = measure(impl, config, args)
    except (MemoryError, RuntimeError) as err:
        text = str(err).strip() or type(err).__name__
        oom = isinstance(err, MemoryError) or any(s in text.lower() for s in OUT_OF_MEMORY)
        result = {"status": "out of memory" if oom else "error", "error": text.splitlines()[0][:400]}
    result["address_space_at_start_mib"] = start_vm
    return result


# -- the parent ---------------------------------------------------------------------------------


def isolated(impl: str, config: str, args: argparse.Namespace) -> dict:
    """One measurement in a fresh process; a failed or killed child becomes a status."""
    options = ["--child", impl, "--configs", config, "--device", args.device, "--seed", str(args.seed)]
    options += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    options += ["--images", str(args.images), "--memory-limit-gib", str(args.memory_limit_gib)]
    try:
        return run_child(__file__, options)
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or "").strip().splitlines()
        last = lines[-1][:400] if lines else ""
        if err.returncode == -9:
            return {"status": "out of memory", "error": f"child killed by SIGKILL (OOM killer?) {last}"}
        if any(s in (err.stderr or "").lower() for s in OUT_OF_MEMORY):
            return {"status": "out of memory", "error": f"exit {err.returncode}: {last}"}
        return {"status": "error", "error": f"exit {err.returncode}: {last}"}
    except (json.JSONDecodeError, IndexError) as err:
        return {"status": "error", "error": f"unreadable child output: {err}"}


def ratio(a: dict, b: dict, key: str) -> float | None:
    if a.get("status") != "ok" or b.get("status") != "ok" or not b.get(key):
        return None
    return a[key] / b[key]


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: measuring on the CPU")
        return "cpu"
    return requested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="NxDxK")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (their median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes before them")
    parser.add_argument("--images", type=int, default=16, help="data points the N rows are split into")
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        help="address-space cap of each child (default 12 on the CPU, none on CUDA; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="default: benchmarks/results/quantizer-<device>.json")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    configs = [parse_config(text) for text in args.configs]
    if args.child:
        print(json.dumps(run_measurement(args.child, configs[0], args)))
        return

    args.device = resolve_device(args.device)
    if args.memory_limit_gib is None:
        args.memory_limit_gib = 12.0 if args.device == "cpu" else 0.0
    out = args.out or Path(__file__).parent / "results" / f"quantizer-{args.device}.json"
    have_vqpytorch = importlib.util.find_spec("vector_quantize_pytorch") is not None
    vqpytorch_version = importlib.metadata.version("vector-quantize-pytorch") if have_vqpytorch else None

    load = os.getloadavg()
    rows = []
    for (n, d, k), text in zip(configs, args.configs, strict=True):
        runs = {}
        for impl in args.impls:
            if impl == "vqpytorch" and not have_vqpytorch:
                runs[impl] = {
                    "status": "skipped",
                    "reason": "vector-quantize-pytorch is not installed (pip install -e '.[bench]')",
                }
            else:
                runs[impl] = isolated(impl, text, args)
            run = runs[impl]
            if run["status"] == "ok":
                print(
                    f"N={n} D={d} K={k:6d} {impl:9s} {run['ms']:9.1f} ms {run['rows_per_second']:10.0f} "
                    f"rows/s  peak +{run['peak_memory_mib']:8.0f} MiB",
                    flush=True,
                )
            else:
                error = run.get("error", run.get("reason", ""))
                print(f"N={n} D={d} K={k:6d} {impl:9s} {run['status']}: {error}", flush=True)
        row: dict = {"rows": n, "dim": d, "codes": k, "runs": runs, "ratios": {}}
        probvq = runs.get("probvq", {})
        for other in ("floor", "vqpytorch"):
            if other in runs:
                ratios = row["ratios"]
                ratios[f"time_probvq_over_{other}"] = ratio(probvq, runs[other], "ms")
                ratios[f"memory_probvq_over_{other}"] = ratio(probvq, runs[other], "peak_memory_mib")
        if probvq.get("status") == "ok" and runs.get("floor", {}).get("status") == "ok":
            row["codes_agree_probvq_floor"] = probvq["checksum"] == runs["floor"]["checksum"]
        row["out_of_memory"] = sorted(i for i, r in runs.items() if r["status"] == "out of memory")
        rows.append(row)

    result = {
        "benchmark": "quantizer",
        "measures": "one vq site: nearest code, straight-through value, codebook + commitment, backward",
        "device": args.device,
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median ms per forward+backward over the repeats",
        "memory": "peak RSS growth over setup (CPU) / peak CUDA allocation over setup (CUDA), MiB",
        "memory_limit_gib": args.memory_limit_gib or None,
        "seed": args.seed,
        "load_average_at_start": list(load),  # the machine may be shared: busy cores slow timings
        "codebook_learning": "gradient (codebook loss), not EMA: the vq family's default (ema=False)",
        "vector_quantize_pytorch": vqpytorch_version,
        "configs": rows,
    }
    print(f"-> {write_result(out, result)}")


if __name__ == "__main__":
    main()
