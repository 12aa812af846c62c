"""A gated PixelCNN over a grid of codes (van den Oord et al. 2016, "Conditional Image Generation
with PixelCNN Decoders"), as an :class:`~probvq.priors.AutoregressivePrior`.

Positions are ordered row-major. Two stacks keep every logit causal without a blind spot:

* the **vertical** stack sees only the rows above: its input is shifted down one row, and its
  ``(k//2 + 1) x k`` convolutions are padded so that output row i reads input rows up to i;
* the **horizontal** stack sees the positions to the left in the same row: its input is shifted
  right one column, its ``1 x (k//2 + 1)`` convolutions are padded on the left, and it adds a 1 x 1
  projection of the vertical stack at the same position.

Each layer is gated, ``tanh(W_f * v + c_f) * sigmoid(W_g * v + c_g)``, where ``c`` holds the
conditioning: a learned embedding of a class label, and/or a 1 x 1 projection of a context map
(e.g. the upsampled codes of an upper layer of a hierarchy). The horizontal stack is residual; the
output head is ``1x1(relu(1x1(relu(h))))`` to K logits. The network reads the site's *values*
(code embeddings, or their relaxed mixtures), as every autoregressive prior does.

``conditional_logits(value)`` is the unconditional call; :meth:`GatedPixelCNN.given` binds a
condition and returns a prior that ``probvq.code`` takes like any other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from probvq.priors import AutoregressivePrior


def _shift_down(x: Tensor) -> Tensor:
    return F.pad(x, (0, 0, 1, 0))[..., :-1, :]


def _shift_right(x: Tensor) -> Tensor:
    return F.pad(x, (1, 0))[..., :-1]


class GatedLayer(nn.Module):
    """One gated layer of both stacks (see the module); ``(v, h, c) -> (v', h')``."""

    def __init__(self, channels: int, kernel: int, cond_channels: int) -> None:
        super().__init__()
        half = kernel // 2
        self.half = half
        self.vertical = nn.Conv2d(channels, 2 * channels, (half + 1, kernel))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, half + 1))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Conv2d(cond_channels, 4 * channels, 1) if cond_channels else None

    @staticmethod
    def _gate(x: Tensor) -> Tensor:
        f, g = x.chunk(2, 1)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, v: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        v_pre = self.vertical(F.pad(v, (self.half, self.half, self.half, 0)))
        h_pre = self.horizontal(F.pad(h, (self.half, 0, 0, 0))) + self.v_to_h(v_pre)
        if self.cond is not None and c is not None:
            c_v, c_h = self.cond(c).chunk(2, 1)
            v_pre, h_pre = v_pre + c_v, h_pre + c_h
        return self._gate(v_pre), h + self.h_out(self._gate(h_pre))


class GatedPixelCNN(AutoregressivePrior):
    """A gated PixelCNN prior over a ``K``-way code grid whose values have ``value_dim`` channels.

    Args:
        num_codes: K. value_dim: channels of a value (D for a codebook).
        hidden: channels of both stacks. layers: gated layers. kernel: odd kernel size.
        num_classes: condition on a class label (``given(labels=...)``), or ``None``.
        context_channels: condition on a context map ``(B, C, *grid)`` (``given(context=...)``), or 0.
    """

    def __init__(
        self,
        num_codes: int,
        value_dim: int,
        hidden: int = 64,
        layers: int = 8,
        kernel: int = 5,
        num_classes: int | None = None,
        context_channels: int = 0,
    ) -> None:
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"num_codes: a code grid needs K >= 2 codes, got {num_codes}")
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel: expected an odd size >= 3, got {kernel}")
        if layers < 1 or hidden < 1 or value_dim < 1:
            raise ValueError(
                f"layers, hidden, value_dim: expected positive sizes, got {layers}, {hidden}, "
                f"{value_dim}"
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes: expected a positive number or None, got {num_classes}")
        self.num_codes, self.value_dim = num_codes, value_dim
        self.num_classes, self.context_channels = num_classes, context_channels
        half = kernel // 2
        self.v_in = nn.Conv2d(value_dim, hidden, (half + 1, kernel))
        self.h_in = nn.Conv2d(value_dim, hidden, (1, half + 1))
        self.half = half
        self.label = nn.Embedding(num_classes, hidden) if num_classes else None
        self.context = nn.Conv2d(context_channels, hidden, 1) if context_channels else None
        cond_channels = hidden if (num_classes or context_channels) else 0
        self.layers = nn.ModuleList(GatedLayer(hidden, kernel, cond_channels) for _ in range(layers))
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_codes, 1)
        )

    def _condition(self, labels: Tensor | None, context: Tensor | None, like: Tensor) -> Tensor | None:
        c = None
        if labels is not None:
            if self.label is None:
                raise ValueError("labels: this PixelCNN was built without num_classes")
            c = self.label(labels)[..., None, None].expand(-1, -1, *like.shape[-2:])
        if context is not None:
            if self.context is None:
                raise ValueError("context: this PixelCNN was built without context_channels")
            projected = self.context(context)
            c = projected if c is None else c + projected
        return c

    def logits(
        self, value: Tensor, labels: Tensor | None = None, context: Tensor | None = None
    ) -> Tensor:
        """``(B, G, G, K)`` logits of ``p(z_n | z_<n, condition)`` from values ``(B, G, G, D)``."""
        if value.dim() != 4 or value.shape[-1] != self.value_dim:
            raise ValueError(
                f"value: expected (batch, rows, columns, {self.value_dim}), got {tuple(value.shape)}"
            )
        x = value.movedim(-1, 1)
        c = self._condition(labels, context, x)
        half = self.half
        v = self.v_in(F.pad(_shift_down(x), (half, half, half, 0)))
        h = self.h_in(F.pad(_shift_right(x), (half, 0, 0, 0)))
        for layer in self.layers:
            v, h = layer(v, h, c)
        return self.head(h).movedim(1, -1)

    def conditional_logits(self, value: Tensor) -> Tensor:
        batch = value.shape[:-3]
        logits = self.logits(value.reshape(-1, *value.shape[-3:]))
        return logits.reshape(*batch, *logits.shape[1:])

    def given(self, labels: Tensor | None = None, context: Tensor | None = None) -> AutoregressivePrior:
        """This prior conditioned on class ``labels`` ``(B,)`` and/or a ``context`` ``(B, C, *grid)``."""
        if labels is None and context is None:
            return self
        return _Bound(self, labels, context)


class _Bound(AutoregressivePrior):
    """A :class:`GatedPixelCNN` with its condition bound (batch ``B`` of labels or context)."""

    def __init__(self, net: GatedPixelCNN, labels: Tensor | None, context: Tensor | None) -> None:
        super().__init__()
        self.net, self.labels, self.cond_map = net, labels, context

    def conditional_logits(self, value: Tensor) -> Tensor:
        batch = value.shape[:-3]
        flat = value.reshape(-1, *value.shape[-3:])
        # Samples stack sample-major over the batch the condition was given for.
        given = self.labels if self.labels is not None else self.cond_map
        repeat = flat.shape[0] // len(given)
        labels = None if self.labels is None else self.labels.repeat(repeat)
        context = None if self.cond_map is None else self.cond_map.repeat(repeat, 1, 1, 1)
        logits = self.net.logits(flat, labels, context)
        return logits.reshape(*batch, *logits.shape[1:])


class UpperContext(nn.Module):
    """The prior of a lower site: ``net`` conditioned on the values of the site ``upper`` above it,
    nearest-upsampled to the lower ``grid`` (a :data:`probvq.swap.ContextualPrior`)."""

    def __init__(self, net: GatedPixelCNN, upper: str, grid: tuple[int, int]) -> None:
        super().__init__()
        self.net, self.upper, self.grid = net, upper, tuple(grid)

    def context(self, value: Tensor) -> Tensor:
        """``(B, D, *grid)`` from the upper site's values ``(B, Gu, Gu, D)``."""
        return F.interpolate(value.movedim(-1, 1), size=self.grid, mode="nearest")

    def forward(self, values: dict[str, Tensor]) -> AutoregressivePrior:
        if self.upper not in values:
            raise ValueError(
                f"context: site {self.upper!r} has not been drawn yet; a lower layer's prior reads "
                "the layers above it"
            )
        return self.net.given(context=self.context(values[self.upper]))
