"""Network builders: the conv encoder and decoder (the VQ-VAE architecture of van den Oord et al.
2017), and a plain MLP.

The encoder halves the resolution with stride-2 4x4 convolutions until it reaches the latent grid,
then applies residual blocks (ReLU, 3x3, ReLU, 1x1) and a 1x1 projection to the code dimension.
The decoder mirrors it with transposed convolutions. Any image side works whose ratio to the grid
side is a power of two, e.g. 28 -> 14 or 7, 32 -> 16, 8 or 4.
"""

from __future__ import annotations

import itertools
import math

from torch import Tensor, nn


class Residual(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def downsampling_steps(image_size: int, grid: int) -> int:
    """How many stride-2 stages take ``image_size`` to ``grid`` (a power of two ratio >= 2)."""
    ratio = image_size / grid if grid > 0 else 0
    steps = round(math.log2(ratio)) if ratio >= 2 else 0
    if steps < 1 or grid * 2**steps != image_size:
        raise ValueError(
            f"grid: the image side {image_size} must be the grid side times a power of two "
            f">= 2, got grid {grid}"
        )
    return steps


def conv_encoder(
    in_channels: int, hidden: int, out_dim: int, image_size: int, grid: int, res_blocks: int = 2
) -> nn.Sequential:
    """``(B, C, S, S) -> (B, out_dim, G, G)`` for image side S and grid side G."""
    layers: list[nn.Module] = []
    channels = in_channels
    for step in range(downsampling_steps(image_size, grid)):
        if step > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Conv2d(channels, hidden, 4, stride=2, padding=1))
        channels = hidden
    layers += [Residual(hidden, hidden // 2 or 1) for _ in range(res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(hidden, out_dim, 1)]
    return nn.Sequential(*layers)


def conv_decoder(
    in_dim: int, hidden: int, out_channels: int, image_size: int, grid: int, res_blocks: int = 2
) -> nn.Sequential:
    """``(B, in_dim, G, G) -> (B, out_channels, S, S)``, the mirror of :func:`conv_encoder`."""
    steps = downsampling_steps(image_size, grid)
    layers: list[nn.Module] = [nn.Conv2d(in_dim, hidden, 3, padding=1)]
    layers += [Residual(hidden, hidden // 2 or 1) for _ in range(res_blocks)]
    for step in range(steps):
        last = step == steps - 1
        layers += [
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, out_channels if last else hidden, 4, stride=2, padding=1),
        ]
    return nn.Sequential(*layers)


class BottomUp(nn.Module):
    """``x -> [a_top, ..., a_finest]``: features at every level's resolution, top first."""

    def __init__(self, channels: int, hidden: int, side: int, grids: list[int], res_blocks: int) -> None:
        super().__init__()
        self.stem = conv_encoder(channels, hidden, hidden, side, grids[-1], res_blocks)
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(hidden, hidden, 4, stride=2, padding=1),
                Residual(hidden, hidden // 2),
            )
            for _ in grids[:-1]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [self.stem(x)]
        for down in self.down:
            features.append(down(features[-1]))
        return features[::-1]


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLUs between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)
