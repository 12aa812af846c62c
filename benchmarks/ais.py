"""Accuracy and cost of annealed importance sampling for log Z, against the exact value.

An RBM with ``--units`` visible units (the size of the ``rbm`` model's latent vector) and
``--hidden`` hidden units, few enough that ``log Z`` is an exact sum over the hidden side
(:meth:`probvq.rbm.RBM.log_z_exact`). Weights ``N(0, scale^2)``, biases ``N(0, 1)``; with
``--from-run RUN_DIR`` the visible biases and the first ``--hidden`` columns of a trained ``rbm``
run's RBM instead (a realistic energy landscape, cut to an enumerable size). For each number of
temperatures: forward AIS from the uniform base and from the exact marginals, and reverse AIS from
exact samples (drawn through the enumerated hidden side), each with ``--chains`` chains; reported:
estimate minus exact, the +-3 se interval, the log-weights' spread and seconds. Usage::

    python benchmarks/ais.py [--units 200] [--hidden 20] [--steps 100 1000 10000] [--chains 100]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import write_result
from probvq.inference import load_checkpoint
from probvq.rbm import RBM, ais


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=20)
    parser.add_argument("--scale", type=float, default=0.15)
    parser.add_argument("--from-run", help="take the RBM of this rbm run's final checkpoint")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--chains", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/ais-cpu.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rbm = RBM(args.units, args.hidden, init_scale=args.scale)
    with torch.no_grad():
        rbm.visible_bias.normal_()
        rbm.hidden_bias.normal_()
        if args.from_run:
            state = load_checkpoint(f"{args.from_run}/final.pt")["model"]
            rbm.weight.copy_(state["energy.rbm.weight"][:, : args.hidden])
            rbm.visible_bias.copy_(state["energy.rbm.visible_bias"])
            rbm.hidden_bias.copy_(state["energy.rbm.hidden_bias"][: args.hidden])
    exact = float(rbm.log_z_exact())
    generator = torch.Generator().manual_seed(args.seed)
    start = rbm.sample_exact(args.chains, generator)
    marginals = rbm.sample_exact(10_000, generator).mean(0).clamp(0.005, 0.995)
    rows = []
    for steps in args.steps:
        runs = {
            "forward, uniform base": {},
            "forward, marginal base": {"base_logits": torch.logit(marginals)},
            "reverse, exact samples": {"base_logits": torch.logit(marginals), "reverse_from": start},
        }
        for name, options in runs.items():
            began = time.perf_counter()
            found = ais(rbm, args.chains, steps, generator=generator, **options)
            seconds = time.perf_counter() - began
            report = found.report()
            kept = ("interval_3se", "log_weight_sd", "effective_chains")
            row = {"run": name, "steps": steps, "error": found.log_z - exact, "seconds": seconds,
                   **{k: report[k] for k in kept}}  # fmt: skip
            row["covers_exact"] = row["interval_3se"][0] <= exact <= row["interval_3se"][1]
            rows.append(row)
            print(f"{steps:>6} {name:<24} error {row['error']:+.4f}  sd(log w) "
                  f"{row['log_weight_sd']:.3f}  ESS {row['effective_chains']:.0f}  "
                  f"covers {row['covers_exact']}  {seconds:.1f} s")  # fmt: skip
    result = {"units": args.units, "hidden": args.hidden, "scale": args.scale,
              "from_run": args.from_run, "chains": args.chains, "log_z_exact": exact,
              "rows": rows}  # fmt: skip
    print(f"exact log Z {exact:.4f}; wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
