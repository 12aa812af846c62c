"""Nearest-code search at scale: chunked (probvq) versus the full N x K distance matrix.

Each method runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its own; the
baseline is the process after allocating the inputs. Usage::

    python benchmarks/codebook.py [--codes 65536 --dim 64 --rows 16384] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import peak_rss_mib, run_child, write_result


def measure(method: str, codes: int, dim: int, rows: int, seed: int) -> dict:
    from probvq import Codebook

    torch.manual_seed(seed)
    book = Codebook(codes, dim, init="normal")
    z = torch.randn(rows, dim)
    base = peak_rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        if method == "chunked":
            index = book.nearest(z)
        else:
            full = z.pow(2).sum(-1, keepdim=True) - 2 * z @ book.weight.T + book.weight.pow(2).sum(-1)
            index = full.argmin(-1)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "seconds": seconds,
        "peak_extra_mib": peak_rss_mib() - base,
        "checksum": int(index[:1000].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=65_536)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16_384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/codebook.json")
    parser.add_argument("--child", choices=("chunked", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.codes, args.dim, args.rows, args.seed)))
        return
    runs = {}
    for method in ("chunked", "full"):
        options = ["--child", method, "--codes", str(args.codes), "--dim", str(args.dim)]
        options += ["--rows", str(args.rows), "--seed", str(args.seed)]
        runs[method] = run_child(__file__, options)
    if runs["chunked"]["checksum"] != runs["full"]["checksum"]:
        raise SystemExit("chunked and full search disagree")
    result = {
        "benchmark": "codebook_nearest",
        "codes": args.codes,
        "dim": args.dim,
        "rows": args.rows,
        "runs": runs,
        "memory_ratio_chunked_over_full": runs["chunked"]["peak_extra_mib"]
        / runs["full"]["peak_extra_mib"],
        "time_ratio_chunked_over_full": runs["chunked"]["seconds"] / runs["full"]["seconds"],
    }
    out_path = write_result(args.out, result)
    for method, run in runs.items():
        print(f"{method:8s} {run['seconds']:6.2f} s  peak +{run['peak_extra_mib']:8.0f} MiB")
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
