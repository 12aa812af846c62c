"""Overhead of probvq/Pyro over a plain PyTorch loop, for one VQ-VAE training step.

Both loops train the same networks (copies of one ``VQVAE``) on the same batches with the same
objective: Bernoulli negative log-likelihood + KL (log K per position) + codebook and commitment
terms, straight-through gradient, global norm clipping, Adam. probvq runs it as a Pyro program under
the ``vq`` family with its ``CodeELBO`` (validation on, as by default); the plain loop calls the
modules directly. probvq's code values are fresh contiguous ``(..., D + 1)`` tensors, so the decoder
reads them channels-last, which makes its transposed convolutions about a third faster on this CPU;
the plain loop makes its decoder input contiguous the same way, so the ratio measures Pyro's
overhead rather than a layout. Timings alternate between the two in blocks, in one process, and
the ratio of medians is reported. Usage::

    python benchmarks/overhead.py [--batch-size 64] [--blocks 150] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import pyro
import torch
from torch import nn

from common import write_result
from probvq import after_step
from probvq.data import synthetic
from probvq.inference import VQ
from probvq.likelihoods import Bernoulli
from probvq.models import VQVAE


def probvq_step(vae, family, optimiser, loss_fn):
    model, guide = family.wrap(vae.model, pyro_params=False), family.wrap(vae.guide, pyro_params=False)

    def step(x):
        loss = loss_fn(model, guide, x) / x.shape[0]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for g in optimiser.param_groups for p in g["params"]], 10.0)
        optimiser.step()
        after_step(vae, family)
        return loss.detach()

    return step


def plain_step(vae, optimiser, beta):
    book = vae.codebook
    log_k = math.log(book.num_codes)

    def step(x):
        zhat = vae.encoder(x).movedim(1, -1)
        index = book.nearest(zhat)
        code = book.embed_index(index)
        # contiguous: the layout of probvq's code values (channels last once moved to NCHW)
        z = (zhat + (code - zhat).detach()).contiguous()
        logits = vae.decoder(z.movedim(-1, 1))
        nll = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
        kl = index[0].numel() * log_k
        commitment = beta * (zhat - code.detach()).pow(2).sum((1, 2, 3))
        codebook = (zhat.detach() - code).pow(2).sum((1, 2, 3))
        loss = (nll + kl + commitment + codebook).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for g in optimiser.param_groups for p in g["params"]], 10.0)
        optimiser.step()
        return loss.detach()

    return step


def timed(step, batches):
    start = time.perf_counter()
    for x in batches:
        step(x)
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--num-codes", type=int, default=64)
    parser.add_argument("--code-dim", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=150, help="alternating timing blocks")
    parser.add_argument("--steps", type=int, default=2, help="steps per block")
    parser.add_argument("--batches", type=int, default=10, help="distinct batches, cycled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args()

    pyro.set_rng_seed(args.seed)
    data = synthetic(n_train=args.batch_size * args.batches, n_valid=1).train.float()
    batches = list(data.split(args.batch_size))
    base = VQVAE((1, 28, 28), Bernoulli(), args.num_codes, args.code_dim, 7, args.hidden)
    base.codebook.initialise(base.encoder(batches[0]).detach().movedim(1, -1))
    vae_pyro, vae_plain = copy.deepcopy(base), copy.deepcopy(base)
    family = VQ(vae_pyro.code_sites)
    loss_fn = family.elbo(max_plate_nesting=1).differentiable_loss
    steps = {
        "probvq": probvq_step(vae_pyro, family, torch.optim.Adam(vae_pyro.parameters()), loss_fn),
        "plain": plain_step(vae_plain, torch.optim.Adam(vae_plain.parameters()), family.beta),
    }

    first = {name: float(step(batches[0])) for name, step in steps.items()}
    if not math.isclose(first["probvq"], first["plain"], rel_tol=1e-4):
        raise SystemExit(f"the two loops disagree on the objective: {first}")
    for step in steps.values():
        timed(step, batches[:3])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for block in range(args.blocks):
        # short blocks, alternating, so that both loops see the same drift of this shared machine
        order = list(steps) if block % 2 == 0 else list(reversed(steps))
        start = (block * args.steps) % len(batches)
        chunk = (batches * 2)[start : start + args.steps]
        for name in order:
            times[name].append(timed(steps[name], chunk))

    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "overhead",
        "ratio_probvq_over_plain": median["probvq"] / median["plain"],
        "seconds_per_step_median": median,
        "seconds_per_step_all": times,
        "objective_at_first_step": first,
        "settings": vars(args),
    }
    out = write_result(args.out, result)
    print(
        f"probvq {1e3 * median['probvq']:.1f} ms/step, plain {1e3 * median['plain']:.1f} ms/step, "
        f"ratio {result['ratio_probvq_over_plain']:.3f} -> {out}"
    )


if __name__ == "__main__":
    main()
