"""The code-site protocol: how models and guides declare discrete latents.

A model declares each discrete latent once as a :class:`CodeSite` (a name, a code space, a grid of
positions) and calls :func:`code` for it in both programs:

* in the model, ``code(site, prior)`` with the site's prior (:data:`~probvq.priors.Prior`: logits
  ``(*batch, *grid, K)``, an autoregressive prior, or an energy);
* in the guide, ``code(site, prior, features)`` with the encoder's features for the site.

Several sites may quantise one feature in sequence (residual quantisation, RQ-VAE / RSQ-VAE): they
are declared as a :class:`CodeGroup` and answered together, ``code(group, priors, features)`` with
one prior per depth. The guide quantises ``r_1 = zhat``, then ``r_{l+1} = r_l - e_{z_l}``, and both
programs read the sum ``sum_l e_{z_l}``.

``code`` is an effectful primitive (message type ``"code"``), like ``pyro.sample``. A guide family,
installed as an effect handler around the programs, answers the message: it chooses the guide's
distribution at each site, issues the ``pyro.sample`` statements (the codes, plus any auxiliary
sites such as SQ's dequantisation variable) and returns the value the program goes on with. Without
a family the model side draws exact codes from the prior (ancestral sampling); the guide side
refuses.

Sites and groups are ``nn.Module`` s, so a model that holds one also holds its code space: the
codebook trains, saves and moves to a device with the model that owns the site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pyro
import torch
from pyro.poutine.runtime import effectful
from torch import Tensor, nn
from torch.distributions import Distribution

from probvq.codes import CodeCategorical
from probvq.priors import AutoregressiveCodes, AutoregressivePrior, EnergyCodes, EnergyPrior, Prior
from probvq.spaces import CodeSpace

DATA_PLATE = "data"
"""Name of the plate over data points; per-example diagnostics reduce over every other dimension."""


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: a {what} name must be an identifier, got {name!r}")


class CodeSite(nn.Module):
    """A discrete latent: ``name``, its code ``space`` and the ``grid`` of positions it covers."""

    def __init__(self, name: str, space: CodeSpace, grid: Sequence[int]) -> None:
        super().__init__()
        _check_name(name, "code site")
        if not isinstance(space, CodeSpace):
            raise TypeError(f"space: expected a CodeSpace, got {type(space).__name__}")
        grid = tuple(grid)
        if not grid or any(not isinstance(n, int) or n < 1 for n in grid):
            raise ValueError(f"grid: expected a tuple of positive sizes, got {grid!r}")
        self.name = name
        self.space = space
        self.grid = grid

    def extra_repr(self) -> str:
        return f"{self.name!r}, grid={self.grid}"

    @property
    def num_codes(self) -> int:
        return self.space.num_codes

    @property
    def value_shape(self) -> torch.Size:
        """What a program reads from the site: ``(*grid, *space.value_shape)``."""
        return torch.Size(self.grid) + self.space.value_shape

    def uniform_logits(self, batch_shape: Sequence[int]) -> Tensor:
        """Zero logits broadcast to ``(*batch_shape, *grid, K)`` as a view (no N x K memory)."""
        shape = (*batch_shape, *self.grid, self.num_codes)
        return self.space.like.new_zeros(()).expand(shape)

    def distribution(self, codes: Distribution) -> Distribution:
        """Declare the per-position distribution ``codes`` over the whole grid (one event)."""
        return codes.to_event(len(self.grid))

    def prior(self, prior: Prior) -> Distribution:
        """The model-side distribution of this site's codes under ``prior``."""
        if isinstance(prior, AutoregressivePrior):
            return AutoregressiveCodes(prior, self.space, self.grid)
        if isinstance(prior, EnergyPrior):
            return EnergyCodes(prior, self.space, self.grid)
        return self.distribution(CodeCategorical(prior, self.space))

    def check_prior(self, prior: Prior) -> None:
        """Refuse a prior that is not one of the three kinds, or logits of the wrong shape."""
        if isinstance(prior, AutoregressivePrior | EnergyPrior):
            return
        if not isinstance(prior, Tensor):
            raise TypeError(
                f"prior: site {self.name!r} takes logits, an AutoregressivePrior or an EnergyPrior, "
                f"got {type(prior).__name__}"
            )
        tail = (*self.grid, self.num_codes)
        if tuple(prior.shape[-len(tail) :]) != tail:
            raise ValueError(
                f"prior: code site {self.name!r} expects logits ending in {tail} (grid, K), "
                f"got {tuple(prior.shape)}"
            )


class CodeGroup(nn.Module):
    """Code sites that quantise one feature in sequence, read by the programs as their sum.

    The sites share a grid and a value shape; they may share a code space (RQ-VAE's shared
    codebook) or have one each.
    """

    def __init__(self, name: str, sites: Sequence[CodeSite]) -> None:
        super().__init__()
        _check_name(name, "code group")
        sites = list(sites)
        if not sites or not all(isinstance(site, CodeSite) for site in sites):
            raise ValueError("sites: a code group needs one or more CodeSites")
        if len({site.name for site in sites}) < len(sites):
            raise ValueError(f"sites: the sites of group {name!r} need distinct names")
        first = sites[0]
        for site in sites[1:]:
            if site.value_shape != first.value_shape:
                raise ValueError(
                    f"sites: group {name!r} mixes values {tuple(first.value_shape)} ({first.name}) "
                    f"and {tuple(site.value_shape)} ({site.name}); residual depths share grid and D"
                )
        self.name = name
        self.sites = nn.ModuleList(sites)

    def __len__(self) -> int:
        return len(self.sites)


@dataclass(frozen=True, eq=False)
class CodeRequest:
    """The payload of a ``"code"`` message: a group of one or more sites, their priors, features."""

    name: str
    sites: tuple[CodeSite, ...]
    priors: tuple[Prior, ...]
    features: Tensor | None

    @property
    def in_guide(self) -> bool:
        return self.features is not None

    @property
    def members(self) -> list[tuple[CodeSite, Prior]]:
        return list(zip(self.sites, self.priors, strict=True))

    def prior_codes(self) -> list[Tensor]:
        """``z_l ~ p(z_l)`` at every depth, as ``pyro.sample`` statements (the generative side)."""
        return [pyro.sample(site.name, site.prior(prior)) for site, prior in self.members]

    def value(self, codes: Sequence[Tensor]) -> Tensor:
        """What the programs read from the group's codes: the sum of their values."""
        values = [site.space.value_of(c) for site, c in zip(self.sites, codes, strict=True)]
        return values[0] if len(values) == 1 else torch.stack(values).sum(0)


def _answer_without_family(request: CodeRequest) -> Tensor:
    if request.in_guide:
        raise RuntimeError(
            f"code site {request.name!r} is declared in a guide but no guide family handles "
            "it: wrap the model and guide with a family (see probvq.inference)"
        )
    return request.value(request.prior_codes())


_code_message = effectful(_answer_without_family, type="code")


def code(
    site: CodeSite | CodeGroup, prior: Prior | Sequence[Prior], features: Tensor | None = None
) -> Tensor:
    """Declare the code site (or group) ``site`` and return the value the program reads.

    Args:
        site: the declared latent, or a :class:`CodeGroup` of residual depths.
        prior: the site's prior; for a group, a sequence with one prior per depth.
        features: encoder features ``(*batch, *grid, ...)``; given in the guide only. Their shape
            is checked by the family that answers (a codebook family reads ``(..., D)``).
    """
    if isinstance(site, CodeGroup):
        if isinstance(prior, Tensor | AutoregressivePrior | EnergyPrior) or len(prior) != len(site):
            raise ValueError(f"prior: group {site.name!r} needs a sequence of {len(site)} priors")
        request = CodeRequest(site.name, tuple(site.sites), tuple(prior), features)
    elif isinstance(site, CodeSite):
        request = CodeRequest(site.name, (site,), (prior,), features)
    else:
        raise TypeError(f"site: expected a CodeSite or CodeGroup, got {type(site).__name__}")
    for member, member_prior in request.members:
        member.check_prior(member_prior)
    if features is not None and not isinstance(features, Tensor):
        raise TypeError(f"features: expected a tensor, got {type(features).__name__}")
    return _code_message(request, name=request.name)


class DiscreteVAE(Protocol):
    """What training and evaluation need from a model: its programs and its code sites.

    ``model(x)`` and ``guide(x)`` take a batch of data (already transformed by the model's
    likelihood) and run inside a ``pyro.plate`` named :data:`DATA_PLATE`. A model may also define

    * ``check_data(x, name)``, which training and evaluation call once before any work;
    * ``data_encoders()``, a sequence of the submodules that are deterministic per-row functions
      of the data alone: in eval mode, row ``i`` of a module's output depends only on row ``i`` of
      the data (no dropout, no batch statistics, no code sampled before it). Evaluation that
      repeats each point's rows, such as importance sampling, then runs them once per point
      (:mod:`probvq.repeats`). Absent means none: everything runs on every row.
    """

    code_sites: Sequence[CodeSite]

    def model(self, x: Tensor) -> None: ...

    def guide(self, x: Tensor) -> None: ...
