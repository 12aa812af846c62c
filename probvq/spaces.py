"""Code spaces: what the K alternatives of a discrete site stand for.

A discrete latent takes one of K codes at every position of its grid. The *value* a model sees is
what the code stands for: the code's embedding ``e_k`` for a codebook (:class:`probvq.Codebook`), or
the unit's state ``h in {0, 1}`` for binary latent vectors (:class:`BinaryUnits`, no codebook). A
relaxed sample is the same map applied to simplex weights, ``e = sum_k w_k e_k``, so hard and relaxed
values live in one space and a code distribution can always name the code a value stands for.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import constraints


class CodeSpace(nn.Module):
    """Abstract base: K codes and the value each stands for.

    Subclasses define :attr:`num_codes`, :attr:`value_shape`, :attr:`support` and the three maps
    between weights, indices and values.
    """

    num_codes: int
    value_shape: torch.Size
    support: constraints.Constraint

    @property
    def like(self) -> Tensor:
        """A tensor of the space's dtype and device, for building logits and values."""
        raise NotImplementedError

    def embed(self, weights: Tensor) -> Tensor:
        """Map simplex weights ``(..., K)`` to values ``(..., *value_shape)``."""
        raise NotImplementedError

    def embed_index(self, index: Tensor) -> Tensor:
        """Map code indices ``(...)`` to values ``(..., *value_shape)``."""
        raise NotImplementedError

    def index_of(self, value: Tensor) -> Tensor:
        """The code a value stands for (the nearest one for a relaxed value)."""
        raise NotImplementedError

    def remember(self, value: Tensor, index: Tensor) -> None:
        """Hint that ``value`` was drawn as code ``index``; spaces may use it to skip a lookup."""


class BinaryUnits(CodeSpace):
    """A vector of binary units ``h in {0, 1}^M`` with no codebook (K = 2 per unit).

    Code 0 stands for ``h = 0`` and code 1 for ``h = 1``; a relaxed value is ``w_1 in (0, 1)``,
    the binary Concrete of Maddison et al. (2017).
    """

    num_codes = 2
    value_shape = torch.Size()
    support = constraints.unit_interval

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_like", torch.zeros(()), persistent=False)

    @property
    def like(self) -> Tensor:
        return self._like

    def embed(self, weights: Tensor) -> Tensor:
        return weights[..., 1]

    def embed_index(self, index: Tensor) -> Tensor:
        return index.to(self._like.dtype)

    def index_of(self, value: Tensor) -> Tensor:
        return (value > 0.5).long()
