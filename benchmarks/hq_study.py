"""The README's HQ-VAE table, from the run directories and evaluations of the four-way comparison.

Each run ``R`` (``probvq train --config configs/hqvae-mnist.toml ... --out DIR/R``) is read with its
evaluation on the held-out images written beside it::

    probvq evaluate DIR/R --checkpoint final --quiet > DIR/R.eval.json

and printed as one markdown row per run (exact ELBO in bits/dim and nats, reconstruction MSE,
surrogate gap, minutes) and one per layer (perplexity over the whole pass, dead codes, rate in
nats, collapse score in nats). Usage::

    python benchmarks/hq_study.py DIR R1 R2 ... [--json DIR/study.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def collect(directory: Path, name: str) -> dict:
    run = directory / name
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluation = json.loads((directory / f"{name}.eval.json").read_text())
    layers = list(evaluation["perplexity"])
    return {
        "name": name,
        "layers": config["layers"],
        "family": config["family"],
        "steps": records[-1]["step"],
        "minutes": records[-1]["seconds"] / 60,
        "examples": evaluation["examples"],
        "exact_elbo": evaluation["exact_elbo"],
        "bits_per_dim": evaluation["exact_bits_per_dim"],
        "mse": evaluation["reconstruction_mse"],
        "gap": evaluation["surrogate_gap"]["mean"],
        "per_layer": {
            layer: {
                "perplexity": evaluation["perplexity"][layer],
                "dead_codes": evaluation["dead_codes"][layer],
                "rate": evaluation["rate"][layer]["mean"],
                "collapse": evaluation["collapse_score"][layer],
            }
            for layer in layers
        },
        "curve": [(r["step"], r["valid"]["exact_bits_per_dim"]) for r in records],
    }


def rows(r: dict) -> list[str]:
    head = (
        f"| {r['layers']} | {r['family']} | {r['bits_per_dim']:.3f} | {r['exact_elbo']['mean']:.1f} ± "
        f"{r['exact_elbo']['se']:.1f} | {r['mse']['mean']:.4f} | {r['gap']:.2f} | {r['minutes']:.1f} |"
    )
    layers = [
        f"|   | {name} | ppl {v['perplexity']:.1f} | dead {v['dead_codes']} | rate {v['rate']:.1f} | "
        f"collapse {v['collapse']['mean']:.1f} ± {v['collapse']['se']:.1f} | |"
        for name, v in r["per_layer"].items()
    ]
    return [head, *layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    study = [collect(args.directory, name) for name in args.runs]
    print("| layers | family | bits/dim | exact ELBO (nats) | recon. MSE | gap | minutes |")
    print("|---|---|---|---|---|---|---|")
    for r in study:
        print("\n".join(rows(r)))
    for r in study:
        curve = ", ".join(f"{step}: {bpd:.3f}" for step, bpd in r["curve"])
        print(f"{r['name']}: {curve}")
    if args.json is not None:
        args.json.write_text(json.dumps(study, indent=1))


if __name__ == "__main__":
    main()
