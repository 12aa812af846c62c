"""Code spaces: what the K alternatives of a discrete site stand for, and how a code travels.

A discrete latent takes one of K codes at every position of its grid. The *value* a program sees is
what the code stands for: the code's embedding ``e_k`` for a codebook (:class:`probvq.Codebook`), or
the unit's state ``h in {0, 1}`` for binary latent vectors (:class:`BinaryUnits`). A relaxed sample
is the same map applied to simplex weights, ``e = sum_k w_k e_k``, so hard and relaxed values live in
one space.

The Pyro sample site of a code holds a *code*: the value together with the index of the code it
stands for, so the index travels with the value explicitly and ``log_prob`` is a pure function of
its arguments (a clone, a copy on another device, a value read back from a trace all score the same
code). How the pair is held is the space's choice:

* :class:`BinaryUnits`: the code is the unit's state itself. A relaxed state ``h`` (binary
  Concrete) stands for ``1[h > 1/2]``, which is exactly the hard draw behind it (``h > 1/2`` iff the
  logistic-perturbed logit is positive), so nothing needs to be added;
* :class:`probvq.Codebook`: the embedding ``(D,)`` plus one channel holding the index as a float,
  ``(D + 1,)``, because a relaxed embedding ``sum_k w_k e_k`` does not name its Gumbel-max code.

:meth:`CodeSpace.value_of`, :meth:`CodeSpace.index_of` and :meth:`CodeSpace.to_code` convert.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import constraints


class CodeSpace(nn.Module):
    """Abstract base: K codes, the value each stands for, and the code a sample site holds.

    Subclasses define :attr:`num_codes`, :attr:`value_shape` (what a program sees per position),
    :attr:`code_shape` (what the sample site holds per position), :attr:`support`, and the maps
    between weights, indices, values and codes.
    """

    num_codes: int
    value_shape: torch.Size
    code_shape: torch.Size
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

    def to_code(self, value: Tensor, index: Tensor) -> Tensor:
        """The code ``(..., *code_shape)`` of ``value`` drawn as code ``index``."""
        raise NotImplementedError

    def value_of(self, code: Tensor) -> Tensor:
        """The value ``(..., *value_shape)`` a program reads from a code."""
        raise NotImplementedError

    def index_of(self, code: Tensor) -> Tensor:
        """The index ``(...)`` of the code a code value stands for (pure: no lookup, no memo)."""
        raise NotImplementedError

    def code_of_index(self, index: Tensor) -> Tensor:
        """The hard code of each index: what ``poutine.condition`` needs to fix a code site."""
        return self.to_code(self.embed_index(index), index)


class BinaryUnits(CodeSpace):
    """A vector of binary units ``h in {0, 1}^M`` with no codebook (K = 2 per unit).

    Code 0 stands for ``h = 0`` and code 1 for ``h = 1``; a relaxed value is ``w_1 in (0, 1)``,
    the binary Concrete of Maddison et al. (2017), and stands for ``1[h > 1/2]``.
    """

    num_codes = 2
    value_shape = torch.Size()
    code_shape = torch.Size()
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

    def to_code(self, value: Tensor, index: Tensor) -> Tensor:
        return value

    def value_of(self, code: Tensor) -> Tensor:
        return code

    def index_of(self, code: Tensor) -> Tensor:
        return (code > 0.5).long()
