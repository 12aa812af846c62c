"""The code-site protocol: how models and guides declare discrete latents.

A model declares each discrete latent once as a :class:`CodeSite` (a name, a code space, a grid of
positions) and calls :func:`code` for it in both programs:

* in the model, ``code(site, prior)`` with the prior logits ``(*batch, *grid, K)`` (uniform, learned,
  or computed top-down from other sites) or any distribution over the site's values;
* in the guide, ``code(site, prior, features)`` with the encoder's features ``(*batch, *grid, D)``.

``code`` is an effectful primitive (message type ``"code"``), like ``pyro.sample``. A guide family,
installed as an effect handler around the programs, answers the message: it chooses the distribution
of the site, issues the ``pyro.sample`` statements (the code itself, plus any auxiliary sites such as
SQ's dequantisation variable) and returns the value the program goes on with. Without a family the
model side draws an exact code from the prior (ancestral sampling); the guide side refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pyro
import torch
from pyro.poutine.runtime import effectful
from torch import Tensor
from torch.distributions import Distribution

from probvq.codes import CodeCategorical
from probvq.spaces import CodeSpace

DATA_PLATE = "data"
"""Name of the plate over data points; per-example diagnostics reduce over every other dimension."""


@dataclass(frozen=True, eq=False)
class CodeSite:
    """A discrete latent: ``name``, its code ``space`` and the ``grid`` of positions it covers."""

    name: str
    space: CodeSpace
    grid: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"name: a code site name must be an identifier, got {self.name!r}")
        if not self.grid or any(int(n) != n or n < 1 for n in self.grid):
            raise ValueError(f"grid: expected a tuple of positive sizes, got {self.grid!r}")

    @property
    def num_codes(self) -> int:
        return self.space.num_codes

    @property
    def value_shape(self) -> torch.Size:
        return torch.Size(self.grid) + self.space.value_shape

    def uniform_logits(self, batch_shape: Sequence[int]) -> Tensor:
        """Zero logits broadcast to ``(*batch_shape, *grid, K)`` as a view (no N x K memory)."""
        shape = (*batch_shape, *self.grid, self.num_codes)
        return self.space.like.new_zeros(()).expand(shape)

    def distribution(self, codes: Distribution) -> Distribution:
        """Declare the per-position distribution ``codes`` over the whole grid (one event)."""
        return codes.to_event(len(self.grid))

    def prior(self, prior: Tensor | Distribution) -> Distribution:
        """The model-side distribution of this site for a prior given as logits or a distribution."""
        if isinstance(prior, Distribution):
            return prior
        return self.distribution(CodeCategorical(prior, self.space))


@dataclass(frozen=True, eq=False)
class CodeRequest:
    """The payload of a ``"code"`` message."""

    site: CodeSite
    prior: Tensor | Distribution
    features: Tensor | None

    @property
    def in_guide(self) -> bool:
        return self.features is not None


def _answer_without_family(request: CodeRequest) -> Tensor:
    if request.in_guide:
        raise RuntimeError(
            f"code site {request.site.name!r} is declared in a guide but no guide family handles "
            "it: wrap the model and guide with a family (see probvq.inference)"
        )
    return pyro.sample(request.site.name, request.site.prior(request.prior))


_code_message = effectful(_answer_without_family, type="code")


def _check_request(site: CodeSite, prior: Tensor | Distribution, features: Tensor | None) -> None:
    if isinstance(prior, Tensor):
        tail = (*site.grid, site.num_codes)
        if tuple(prior.shape[-len(tail) :]) != tail:
            raise ValueError(
                f"prior: code site {site.name!r} expects logits ending in {tail} (grid, K), "
                f"got {tuple(prior.shape)}"
            )
    elif not isinstance(prior, Distribution):
        raise TypeError(f"prior: expected logits or a Distribution, got {type(prior).__name__}")
    if features is not None:
        tail = tuple(site.value_shape)
        if tuple(features.shape[-len(tail) :]) != tail or features.dim() <= len(tail):
            raise ValueError(
                f"features: code site {site.name!r} expects (*batch, {', '.join(map(str, tail))}), "
                f"got {tuple(features.shape)}"
            )


def code(site: CodeSite, prior: Tensor | Distribution, features: Tensor | None = None) -> Tensor:
    """Declare the code site ``site`` and return its value (hard or relaxed embeddings).

    Args:
        site: the declared latent.
        prior: prior logits ``(*batch, *grid, K)``, or a distribution over the site's values.
        features: encoder features ``(*batch, *grid, *value_shape)``; given in the guide only.
    """
    _check_request(site, prior, features)
    return _code_message(CodeRequest(site, prior, features), name=site.name)


class DiscreteVAE(Protocol):
    """What training and evaluation need from a model: its programs and its code sites.

    ``model(x)`` and ``guide(x)`` take a batch of data (already transformed by the model's
    likelihood) and run inside a ``pyro.plate`` named :data:`DATA_PLATE`. A model may also define
    ``check_data(x, name)``, which training and evaluation call once before any work.
    """

    code_sites: Sequence[CodeSite]

    def model(self, x: Tensor) -> None: ...

    def guide(self, x: Tensor) -> None: ...
