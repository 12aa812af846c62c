"""The README's depth table, from the run directories and evaluations of the depth study.

Each run ``R`` (trained by ``probvq train --model deep ... --out DIR/R``) is read with what was
written beside it::

    probvq evaluate DIR/R --checkpoint final --quiet > DIR/R.eval.json     # all validation images
    probvq diagnose DIR/R --checkpoint final --k 1000 --limit N --out DIR/R-diag --quiet

and printed as one markdown row (exact ELBO and surrogate gap on the whole validation split; IWAE
and k-hat on its first N images; rates per layer; wall time of the run), then the per-layer rates
and gaps of each run, and the learning curves (validation exact ELBO at each evaluation). Usage::

    python benchmarks/depth_study.py DIR R1 R2 ... [--json DIR/study.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _layers(names: list[str]) -> list[str]:
    """Code layers top first (``z32``, ..., ``z1``)."""
    return sorted((n for n in names if n[1:].isdigit()), key=lambda n: -int(n[1:]))


def collect(directory: Path, name: str) -> dict:
    run = directory / name
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    faults = (run / "faults.jsonl").read_text().splitlines() if (run / "faults.jsonl").exists() else []
    evaluation = json.loads((directory / f"{name}.eval.json").read_text())
    diag_path = directory / f"{name}-diag" / "summary.json"
    diag = json.loads(diag_path.read_text()) if diag_path.exists() else None
    layers = _layers(list(evaluation["rate"]))
    rates = {n: evaluation["rate"][n]["mean"] for n in layers}
    return {
        "name": name,
        "layers": config["num_layers"],
        "family": config["family"],
        "straight_through": config.get(config["family"], {}).get("straight_through"),
        "hidden": config["hidden"],
        "steps": records[-1]["step"],
        "minutes": records[-1]["seconds"] / 60,
        "skipped": len(faults),
        "exact_elbo": evaluation["exact_elbo"],
        "surrogate_gap": evaluation["surrogate_gap"],
        "gap_by_site": evaluation["surrogate_gap_by_site"],
        "rate": rates,
        "total_rate": sum(rates.values()),
        "distortion": evaluation["distortion"]["x"]["mean"],
        "active": sum(r > 1.0 for r in rates.values()),
        "collapsed": sum(r < 0.1 for r in rates.values()),
        "iwae": diag and diag["iwae"],
        "khat_above_07": diag and diag["pareto_khat"]["share_above_0.7"],
        "iwae_points": diag and diag["examples"],
        "curve": [(r["step"], r["valid"]["exact_elbo"]["mean"]) for r in records],
    }


def row(r: dict) -> str:
    family = r["family"] + ("" if r["straight_through"] in (None, True) else " (soft)")
    iwae = f"{r['iwae']['mean']:.1f} ± {r['iwae']['se']:.1f}" if r["iwae"] else "—"
    khat = f"{100 * r['khat_above_07']:.0f} %" if r["khat_above_07"] is not None else "—"
    return (
        f"| {r['layers']} | {family} | {r['hidden']} | {r['exact_elbo']['mean']:.1f} ± "
        f"{r['exact_elbo']['se']:.1f} | {r['surrogate_gap']['mean']:.2f} | {iwae} | {khat} | "
        f"{r['total_rate']:.1f} | {r['distortion']:.1f} | {r['active']} / {r['collapsed']} | "
        f"{r['minutes']:.1f} | {r['skipped']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    study = [collect(args.directory, name) for name in args.runs]
    print("| L | family | width | exact ELBO | gap | IWAE k=1000 | k̂ > 0.7 | rate | distortion "
          "| layers > 1 nat / < 0.1 nat | minutes | skipped |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in study:
        print(row(r))
    for r in study:
        rates = ", ".join(f"{n} {v:.1f}" for n, v in r["rate"].items())
        gaps = ", ".join(f"{n} {v:.2f}" for n, v in r["gap_by_site"].items())
        curve = ", ".join(f"{step}: {elbo:.1f}" for step, elbo in r["curve"])
        print(f"\n{r['name']}: rates {rates}\n  gap by site {gaps}\n  curve {curve}")
    if args.json:
        args.json.write_text(json.dumps(study, indent=1) + "\n")


if __name__ == "__main__":
    main()
