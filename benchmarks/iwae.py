"""Importance-weighted evaluation of the vqvae model: samples per second and peak memory.

For each family and memory cap, a fresh subprocess builds the default ``vqvae`` (28 x 28 binary
images; a trained run's weights with ``--run``) and times :func:`probvq.inference.diagnose` with
``k`` draws for each of ``--points`` images: IWAE, its convergence curve, PSIS k-hat and the per-site
decomposition. The baseline, in the same process, is the floor of the draws: the bare importance
passes (:func:`~probvq.inference.objectives.importance.log_weights` over the same points with the
rows per pass ``diagnose`` chose, and nothing else), which do each draw's own work on every row
(code sample, decoder, likelihood, scores) and run the model's data encoders once per point of a
pass. ``cost_over_floor`` is diagnose's time over the floor's: what the rest of the diagnostics
costs. ``every_row`` times diagnose again on the same model with its declaration of data encoders
hidden, so the encoder runs on every row (how diagnose ran before models declared them). Times
are the fastest of ``--repeats`` interleaved rounds.
Memory is reported two ways: the peak of live tensors (what the cap limits) and the growth of the
process's peak resident size. Usage::

    python benchmarks/iwae.py [--k 1000 --points 16 --memory-mib 256 1024 --repeats 3] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from common import peak_rss_mib, run_child, write_result


def build_model(family: str, run: str | None, seed: int):
    from probvq.build import build, load_data, resolve
    from probvq.config import RunConfig
    from probvq.inference import RunDir, load_checkpoint

    if run is None:
        config = RunConfig(model="vqvae", family=family, train_limit=64, seed=seed)
    else:
        config = RunConfig.from_dict(RunDir.open(run).config())
    dataset = load_data(config)
    pyro.set_rng_seed(seed)
    vae, fam = build(resolve(config, dataset), dataset)
    if run is not None:
        state = load_checkpoint(RunDir(run).checkpoint("best"))
        vae.load_state_dict(state["model"])
        fam.load_state_dict(state["family"])
    return vae, fam, vae.likelihood.prepare(dataset.valid)


def measure(
    family: str, run: str | None, k: int, points: int, memory_mib: float, seed: int, repeats: int
) -> dict:
    from probvq.inference import diagnose
    from probvq.inference.diagnostics.diagnose import Diagnostics
    from probvq.inference.diagnostics.memory import PeakMemory
    from probvq.inference.objectives.importance import log_weights
    from probvq.repeats import data_encoders

    vae, fam, x = build_model(family, run, seed)
    x = x[:points]
    diagnose(vae, fam, x[:1], k=k, memory_mib=memory_mib, seed=seed)  # warm-up
    base_rss = peak_rss_mib()
    with PeakMemory() as peak:
        found = diagnose(vae, fam, x, k=k, memory_mib=memory_mib, seed=seed)
    rss_extra = peak_rss_mib() - base_rss
    model, guide = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)

    def declared() -> Diagnostics:
        return diagnose(vae, fam, x, k=k, memory_mib=memory_mib, seed=seed)

    def every_row() -> Diagnostics:
        vae.data_encoders = lambda: ()  # shadows the declaration on this instance only
        try:
            return diagnose(vae, fam, x, k=k, memory_mib=memory_mib, seed=seed)
        finally:
            del vae.data_encoders

    def floor() -> None:
        vae.eval()
        fam.eval()
        with torch.no_grad(), fam.exact():
            for _ in log_weights(model, guide, x, k, found.rows_per_pass, data_encoders(vae)):
                pass

    # Interleaved rounds, the fastest of each kept: other work on the machine only slows a run.
    seconds: dict[str, float] = {}
    results: dict[str, Diagnostics | None] = {}
    for _ in range(repeats):
        for name, job in (("declared", declared), ("every_row", every_row), ("floor", floor)):
            start = time.perf_counter()
            results[name] = job()
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - start)
    summary = found.summary()
    return {
        "family": family,
        "memory_cap_mib": memory_mib,
        "rows_per_pass": found.rows_per_pass,
        "seconds": seconds["declared"],
        "samples_per_second": points * k / seconds["declared"],
        "floor_seconds": seconds["floor"],
        "cost_over_floor": seconds["declared"] / seconds["floor"],
        "every_row": {
            "rows_per_pass": results["every_row"].rows_per_pass,
            "seconds": seconds["every_row"],
            "cost_over_floor": seconds["every_row"] / seconds["floor"],
        },
        "peak_tensor_mib": peak.bytes / 2**20,
        "peak_rss_extra_mib": rss_extra,
        "iwae": summary["iwae"]["mean"],
        "exact_elbo": summary["exact_elbo"]["mean"],
        "khat_share_above_0.7": summary["pareto_khat"]["share_above_0.7"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["vq", "sq", "rr"])
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--memory-mib", type=float, nargs="+", default=[256.0, 1024.0])
    parser.add_argument("--run", help="a run directory whose best checkpoint to load (one family)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the fastest is kept")
    parser.add_argument("--out", default="benchmarks/results/iwae.json")
    parser.add_argument("--child", nargs=2, metavar=("FAMILY", "MIB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        family, mib = args.child[0], float(args.child[1])
        found = measure(family, args.run, args.k, args.points, mib, args.seed, args.repeats)
        print(json.dumps(found))
        return
    if args.run:
        args.families = [json.loads((Path(args.run) / "config.json").read_text())["family"]]
    runs = []
    for family in args.families:
        for mib in args.memory_mib:
            options = ["--child", family, str(mib), "--k", str(args.k), "--points", str(args.points)]
            options += ["--seed", str(args.seed), "--repeats", str(args.repeats)]
            options += ["--run", args.run] if args.run else []
            run = run_child(__file__, options)
            runs.append(run)
            print(
                f"{family:3s} cap {mib:6.0f} MiB: {run['samples_per_second']:8.0f} samples/s, "
                f"{run['cost_over_floor']:.2f} x the floor "
                f"({run['every_row']['cost_over_floor']:.2f} x with the encoder on every row), "
                f"rows/pass {run['rows_per_pass']}, peak tensors {run['peak_tensor_mib']:.0f} MiB, "
                f"RSS +{run['peak_rss_extra_mib']:.0f} MiB"
            )
    result = {"benchmark": "iwae", "model": "vqvae", "k": args.k, "points": args.points}
    result |= {"repeats": args.repeats, "runs": runs}
    print(f"-> {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
