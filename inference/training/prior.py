"""The second stage: fit an autoregressive prior to the codes a trained model infers.

VQ-VAE (van den Oord et al. 2017) samples by fitting a PixelCNN to the grid of codes its encoder
assigns to the training images. Here the codes come from the family's *exact* guide (hard codes,
``argmin`` for ``vq``, draws from q otherwise), are extracted once per split and cached, and the
prior is fitted by maximum likelihood, ``min -sum_n log p(z_n | z_<n)`` in nats per grid, its
validation NLL measured after every epoch. :func:`fit_prior` saves a checkpoint after every epoch
and continues from one, so a stopped fit resumes where it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from pyro import poutine
from torch import Tensor, nn
from tqdm.auto import tqdm

from probvq.priors import AutoregressiveCodes, AutoregressivePrior
from probvq.sites import CodeSite, DiscreteVAE

from ..objectives.evaluate import check_inputs, evaluation
from ..objectives.terms import code_indices
from .checkpoint import load_checkpoint, save_checkpoint


def extract_codes(
    vae: DiscreteVAE,
    family: nn.Module,
    x: Tensor,
    site: str,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """The exact guide's code indices ``(N, *grid)`` at ``site`` for prepared data ``x``."""
    check_inputs(vae, x)
    guide = family.wrap(vae.guide, pyro_params=False)
    found = []
    with evaluation(vae, family, seed) as device, family.exact():
        starts = range(0, x.shape[0], batch_size)
        for start in tqdm(starts, desc=f"codes {site}", disable=not progress, leave=False):
            guide_trace = poutine.trace(guide).get_trace(x[start : start + batch_size].to(device))
            found.append(code_indices(guide_trace)[site][1].cpu())
    return torch.cat(found)


def grid_nll(prior: AutoregressivePrior, site: CodeSite, index: Tensor, batch_size: int = 500) -> float:
    """Mean ``-log p(z)`` in nats per grid of the codes ``index`` ``(N, *grid)`` under ``prior``."""
    codes = AutoregressiveCodes(prior, site.space, site.grid)
    device = site.space.like.device
    total = 0.0
    with torch.no_grad():
        for start in range(0, index.shape[0], batch_size):
            code = site.space.code_of_index(index[start : start + batch_size].to(device))
            total += float(-codes.log_prob(code).double().sum())
    return total / index.shape[0]


def fit_prior(
    prior: AutoregressivePrior,
    site: CodeSite,
    train: Tensor,
    valid: Tensor,
    epochs: int,
    path: Path,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Fit ``prior`` to the code indices ``train`` of ``site`` for ``epochs`` epochs; returns the
    history (``epoch``, ``train_nll``, ``valid_nll``, nats per grid).

    ``path`` holds the checkpoint written after every epoch (the prior, Adam's state, the random
    state and the history); if it exists, the fit continues from it. ``site``'s code space is
    read, never trained.
    """
    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(
            f"epochs, batch_size, lr: expected positive values, got {epochs}, {batch_size}, {lr}"
        )
    for name, index in (("train", train), ("valid", valid)):
        if index.shape[0] == 0 or tuple(index.shape[1:]) != site.grid:
            raise ValueError(f"{name}: expected codes (N >= 1, {site.grid}), got {tuple(index.shape)}")
    optimiser = torch.optim.Adam(prior.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    if path.exists():
        state = load_checkpoint(path)
        prior.load_state_dict(state["prior"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        history = state["history"]
    codes = AutoregressiveCodes(prior, site.space, site.grid)
    device = site.space.like.device
    for epoch in range(len(history) + 1, epochs + 1):
        prior.train()
        order = torch.randperm(train.shape[0], generator=generator)
        total = 0.0
        batches = range(0, train.shape[0], batch_size)
        for start in tqdm(
            batches, desc=f"prior epoch {epoch}/{epochs}", disable=not progress, leave=False
        ):
            with torch.no_grad():
                code = site.space.code_of_index(train[order[start : start + batch_size]].to(device))
            loss = -codes.log_prob(code).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * code.shape[0]
        prior.eval()
        record = {
            "epoch": epoch,
            "train_nll": total / train.shape[0],
            "valid_nll": grid_nll(prior, site, valid),
        }
        history.append(record)
        save_checkpoint(
            path,
            {
                "prior": prior.state_dict(),
                "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(),
                "history": history,
            },
        )
        if log is not None:
            log(record)
    return history
