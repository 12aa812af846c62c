"""The second stage: fit an autoregressive prior to the codes a trained model infers.

VQ-VAE (van den Oord et al. 2017) samples by fitting a PixelCNN to the grid of codes its encoder
assigns to the training images. Here the codes come from the family's *exact* guide (hard codes,
``argmin`` for ``vq``, draws from q otherwise), are extracted once per split and cached, and the
prior is fitted by maximum likelihood, ``min -sum_n log p(z_n | z_<n)`` in nats per grid, its
validation NLL measured after every epoch. :func:`fit_prior` saves a checkpoint after every epoch
and continues from one, so a stopped fit resumes where it was. A lower layer's prior may read the
codes of a layer above it (:class:`~probvq.pixelcnn.UpperContext`): pass that layer's site and
codes as ``upper``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    sites: Sequence[str],
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The exact guide's code indices ``(N, *grid)`` at each of ``sites`` for prepared data ``x``
    (one guide pass per batch: the codes of different sites belong to the same draws)."""
    check_inputs(vae, x)
    guide = family.wrap(vae.guide, pyro_params=False)
    found: dict[str, list[Tensor]] = {name: [] for name in sites}
    with evaluation(vae, family, seed) as device, family.exact():
        starts = range(0, x.shape[0], batch_size)
        for start in tqdm(starts, desc="codes", disable=not progress, leave=False):
            guide_trace = poutine.trace(guide).get_trace(x[start : start + batch_size].to(device))
            indices = code_indices(guide_trace)
            for name in sites:
                found[name].append(indices[name][1].cpu())
    return {name: torch.cat(parts) for name, parts in found.items()}


Upper = tuple[CodeSite, Tensor]
"""A layer above and its codes ``(N, *grid)`` (aligned with the fitted site's), for a prior that
reads them."""


def _codes(
    prior: AutoregressivePrior | nn.Module, site: CodeSite, upper: Upper | None, rows: Tensor
) -> AutoregressiveCodes:
    """The site's codes under ``prior``, bound to the upper layer's codes of ``rows`` if any."""
    if upper is None:
        return AutoregressiveCodes(prior, site.space, site.grid)
    upper_site, index = upper
    device = upper_site.space.like.device
    value = upper_site.space.value_of(upper_site.space.code_of_index(index[rows].to(device)))
    return AutoregressiveCodes(prior({upper_site.name: value.detach()}), site.space, site.grid)


def grid_nll(
    prior: AutoregressivePrior | nn.Module,
    site: CodeSite,
    index: Tensor,
    upper: Upper | None = None,
    batch_size: int = 500,
) -> float:
    """Mean ``-log p(z)`` in nats per grid of the codes ``index`` ``(N, *grid)`` under ``prior``."""
    device = site.space.like.device
    total = 0.0
    with torch.no_grad():
        for start in range(0, index.shape[0], batch_size):
            rows = torch.arange(start, min(start + batch_size, index.shape[0]))
            code = site.space.code_of_index(index[rows].to(device))
            total += float(-_codes(prior, site, upper, rows).log_prob(code).double().sum())
    return total / index.shape[0]


def check_fit_settings(epochs: int, batch_size: int, lr: float) -> None:
    """Refuse a fit that cannot run, before any codes are extracted."""
    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(
            f"epochs, batch_size, lr: expected positive values, got {epochs}, {batch_size}, {lr}"
        )


def fit_prior(
    prior: AutoregressivePrior | nn.Module,
    site: CodeSite,
    train: Tensor,
    valid: Tensor,
    epochs: int,
    path: Path,
    upper: tuple[Upper, Upper] | None = None,
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
    read, never trained. ``upper`` gives the layer above and its train and valid codes for a prior
    that reads them (an :class:`~probvq.pixelcnn.UpperContext`).
    """
    check_fit_settings(epochs, batch_size, lr)
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
    upper_train, upper_valid = upper if upper is not None else (None, None)
    device = site.space.like.device
    for epoch in range(len(history) + 1, epochs + 1):
        prior.train()
        order = torch.randperm(train.shape[0], generator=generator)
        total = 0.0
        batches = range(0, train.shape[0], batch_size)
        for start in tqdm(
            batches, desc=f"prior epoch {epoch}/{epochs}", disable=not progress, leave=False
        ):
            rows = order[start : start + batch_size]
            with torch.no_grad():
                code = site.space.code_of_index(train[rows].to(device))
            loss = -_codes(prior, site, upper_train, rows).log_prob(code).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * code.shape[0]
        prior.eval()
        record = {
            "epoch": epoch,
            "train_nll": total / train.shape[0],
            "valid_nll": grid_nll(prior, site, valid, upper_valid),
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
