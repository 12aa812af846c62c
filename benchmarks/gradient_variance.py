"""Gradient noise of each guide family on one fixed batch: the score function against relaxations.

For the single-layer ``vqvae`` (binarized MNIST if ``--data`` is given, the built-in synthetic data
otherwise), one model initialised from ``--seed`` and one batch of ``--batch-size`` images, each
family draws ``--draws`` independent gradients of its training loss (without the score baseline's
own regression term) with respect to the encoder's parameters. Reported per family: the norm of
the mean gradient, the total variance ``sum_i Var[g_i]`` over the encoder's parameters, their
ratio (signal to noise) and the variance relative to ``rr``'s. ``score`` is measured twice: with
its baseline as initialised, and after ``--fit-baseline`` steps that fit only the baseline and its
running statistics on the same batch (what NVIL's baseline does during training). Usage::

    python benchmarks/gradient_variance.py [--data ../shared/data/binarized_mnist] [--out ...json]
"""

from __future__ import annotations

import argparse

import pyro
import torch

from common import write_result
from probvq.build import build, load_data, resolve
from probvq.config import RunConfig


def family_gradients(vae, family, x, draws: int) -> torch.Tensor:
    """``(draws, P)`` encoder gradients of the family's training loss on ``x``."""
    elbo = family.elbo(max_plate_nesting=1)
    programs = family.wrap(vae.model, pyro_params=False), family.wrap(vae.guide, pyro_params=False)
    params = list(vae.encoder.parameters())
    rows = []
    for _ in range(draws):
        parts = elbo.differentiable_parts(*programs, x)
        loss = sum(
            v for found in parts.values() for n, v in found.items() if not n.endswith(".baseline")
        )
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss / len(x), params)]))
    return torch.stack(rows)


def fit_baseline(vae, family, x, steps: int) -> None:
    """Fit only the score family's baseline (and running statistics) on ``x``."""
    elbo = family.elbo(max_plate_nesting=1)
    programs = family.wrap(vae.model, pyro_params=False), family.wrap(vae.guide, pyro_params=False)
    optimiser = torch.optim.Adam(family.baseline.parameters(), lr=1e-2)
    for _ in range(steps):
        parts = elbo.differentiable_parts(*programs, x)
        loss = sum(v for found in parts.values() for n, v in found.items() if n.endswith(".baseline"))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def summary(grads: torch.Tensor) -> dict:
    mean = grads.mean(0)
    variance = float(grads.var(0).sum())
    return {
        "mean_norm": float(mean.norm()),
        "total_variance": variance,
        "snr": float(mean.norm() ** 2) / variance,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data")
    parser.add_argument("--families", nargs="+", default=["rr", "sq", "gumbel", "score"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--fit-baseline", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/gradient-variance-cpu.json")
    args = parser.parse_args()
    rows = {}
    for name in args.families:
        config = RunConfig(data=args.data, family=name, seed=args.seed)
        dataset = load_data(config)
        config = resolve(config, dataset)
        pyro.set_rng_seed(args.seed)
        vae, family = build(config, dataset)
        x = vae.likelihood.prepare(dataset.train[: args.batch_size])
        with torch.no_grad():  # k-means (or data) initialisation of the codebook, as training does
            family.wrap(vae.guide, pyro_params=False)(x)
        family.eval()
        measured = {name: family_gradients(vae, family, x, args.draws)}
        if name == "score":
            family.train()
            fit_baseline(vae, family, x, args.fit_baseline)
            family.eval()
            measured["score (fitted baseline)"] = family_gradients(vae, family, x, args.draws)
        for label, grads in measured.items():
            rows[label] = summary(grads)
    reference = rows.get("rr", next(iter(rows.values())))["total_variance"]
    for label, row in rows.items():
        row["variance_vs_rr"] = row["total_variance"] / reference
        print(
            f"{label:26s} |mean| {row['mean_norm']:10.4f}  variance {row['total_variance']:12.4f}  "
            f"snr {row['snr']:8.4f}  x rr {row['variance_vs_rr']:8.1f}"
        )
    write_result(args.out, {"settings": vars(args), "families": rows})


if __name__ == "__main__":
    main()
