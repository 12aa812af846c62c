"""Sampling speed of the gated PixelCNN prior: a batch of grids drawn at once against one by one.

Ancestral sampling of a G x G grid takes G^2 passes of the network (row-major, one position per
pass, :class:`probvq.priors.AutoregressiveCodes`). Drawing ``--n`` grids in one batch shares every
pass; the baseline draws them one at a time in the same process. Reported: seconds for the batch,
seconds one by one, their ratio, and samples per second, for each ``--grid``. Usage::

    python benchmarks/pixelcnn_sampling.py [--n 64] [--grid 7 8] [--device cpu] [--out ...json]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import write_result
from probvq.codebook import Codebook
from probvq.pixelcnn import GatedPixelCNN
from probvq.priors import AutoregressiveCodes


def timed(draw, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    draw()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--grid", type=int, nargs="+", default=[7, 8])
    parser.add_argument("--num-codes", type=int, default=64)
    parser.add_argument("--code-dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/pixelcnn-sampling-cpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    space = Codebook(args.num_codes, args.code_dim, init="normal").to(device)
    net = GatedPixelCNN(args.num_codes, args.code_dim, args.hidden, args.layers).to(device).eval()
    rows = []
    for side in args.grid:
        codes = AutoregressiveCodes(net, space, (side, side))
        codes.sample(torch.Size([2]))  # warm-up
        batch = timed(lambda codes=codes: codes.sample(torch.Size([args.n])), device)
        single = timed(
            lambda codes=codes: [codes.sample(torch.Size([1])) for _ in range(args.n)], device
        )
        row = {
            "grid": side,
            "n": args.n,
            "batched_s": batch,
            "one_by_one_s": single,
            "speedup": single / batch,
            "samples_per_s": args.n / batch,
        }
        rows.append(row)
        print(
            f"{side}x{side}: {args.n} samples in {batch:.2f} s batched ({row['samples_per_s']:.0f}/s), "
            f"{single:.2f} s one by one ({row['speedup']:.1f}x)"
        )
    write_result(args.out, {"settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
