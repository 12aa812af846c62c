"""A deep top-down hierarchy of discrete code grids (relaxed-responsibility HVAE, Willetts et al. 2020).

Generative story, for each image x, with layers numbered from the top (L) down to the data (1)::

    h_L   = c                                      a learned constant state (the top has no parent)
    z_l   ~ Cat(softmax(prior_l(h_l)))             at every position of layer l's grid, l = L .. 1
    u_l   = h_l + inject_l(e_{z_l})                 the codes enter the residual state,
    h_l-1 = u_l + branch_l(u_l)                     which is carried down (upsampled twice when
                                                    the next layer's grid is finer)
    x     ~ p(x | decoder(h_0))

so ``p(z_l | z_{>l})`` is a categorical grid whose logits come from the top-down state. The guide
walks the *same* top-down path on its own codes and, at each layer, reads a bottom-up feature of x
at that layer's resolution::

    q(z_l | x, z_{>l}):   features zhat_l = posterior_l(h_l, a_r(x)),  prior logits prior_l(h_l)

and hands both to ``probvq.code``: the guide family turns them into q (``rr``: responsibilities
weighted by the top-down prior; ``sq``, ``vq``, ... likewise without model changes). The rate of
each layer is the analytic categorical KL per position at the sampled upper codes.

What is taken from where:

* top-down inference sharing the generative path, with the posterior reading the bottom-up
  feature and the top-down state (Ladder VAE, Sonderby et al. 2016; IAF-VAE, Kingma et al. 2016);
* the residual state carried down, a learned constant at the top, nearest-neighbour upsampling
  between resolutions and several layers per resolution (VDVAE, Child 2021; NVAE, Vahdat and Kautz
  2020);
* residual branches whose last layer starts scaled by ``1 / sqrt(L)`` and prior heads that start
  at zero (a uniform prior), so a deep stack starts near the identity (VDVAE's initialisation).
  The codes' projection into the state is *not* scaled down: with it at ``1 / sqrt(32)`` the decoder
  barely felt any single layer and a 32-layer model stayed collapsed (rate 0) for 500 steps of
  binarized MNIST, where at full scale it started using its codes after about 250;
* discrete latents with the responsibilities of a mixture whose weights are the top-down prior
  (Willetts et al. 2020, of which only the abstract was at hand: the rest is ours).

Layers are spread over ``levels`` resolutions, ``grid``, ``2 grid``, ... (top first); the top
levels take one more layer when ``L`` does not divide evenly. ``code_sites`` lists the layers top
first: ``z{L}``, ..., ``z1``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from probvq.codebook import Codebook
from probvq.imagemodel import TopDownModel
from probvq.likelihoods import Likelihood
from probvq.nets import BottomUp, Residual, conv_decoder
from probvq.sites import CodeSite, code

MAX_LAYERS = 32


def layers_per_level(num_layers: int, levels: int) -> list[int]:
    """How many of ``num_layers`` layers each of ``levels`` resolutions holds, top first."""
    return [num_layers // levels + (level < num_layers % levels) for level in range(levels)]


def _head(in_channels: int, bottleneck: int, out_channels: int) -> nn.Sequential:
    """``conv1x1(relu(conv3x3(relu(x))))``: a per-layer head at the layer's resolution."""
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(in_channels, bottleneck, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(bottleneck, out_channels, 1),
    )


class TopDownLayer(nn.Module):
    """One layer ``l``: its code site, prior and posterior heads, and the state update.

    Args:
        site: the layer's code site. hidden: channels of the state. bottleneck: inner channels.
        level: index of its resolution among the bottom-up features. upsample: the state arrives
        at half this layer's resolution. branch_scale: initial scale of the residual branch.
    """

    def __init__(
        self,
        site: CodeSite,
        hidden: int,
        bottleneck: int,
        level: int,
        upsample: bool,
        branch_scale: float,
    ) -> None:
        super().__init__()
        code_dim = site.space.value_shape.numel()
        self.site, self.level, self.upsample = site, level, upsample
        self.prior_head = _head(hidden, bottleneck, site.num_codes)
        self.posterior_head = _head(2 * hidden, bottleneck, code_dim)
        self.inject = nn.Conv2d(code_dim, hidden, 1)
        self.block = Residual(hidden, bottleneck)
        with torch.no_grad():
            self.prior_head[-1].weight.zero_()
            self.prior_head[-1].bias.zero_()
            self.block.block[-1].weight.mul_(branch_scale)

    def prior_logits(self, h: Tensor) -> Tensor:
        """``(B, G, G, K)`` logits of ``p(z_l | z_{>l})`` from the state."""
        return self.prior_head(h).movedim(1, -1)

    def features(self, h: Tensor, bottom_up: Tensor) -> Tensor:
        """``(B, G, G, D)`` posterior features from the state and the bottom-up feature."""
        return self.posterior_head(torch.cat([h, bottom_up], 1)).movedim(1, -1)

    def update(self, h: Tensor, z: Tensor) -> Tensor:
        """The state passed down: ``u + branch(u)`` with ``u = h + inject(z)``."""
        return self.block(h + self.inject(z.movedim(-1, 1)))


class DeepVAE(TopDownModel):
    """L top-down layers of code grids with learned conditional priors (see the module).

    Args:
        image_shape: ``(C, S, S)``. likelihood: the observation model.
        num_layers: L, 1 to 32. levels: resolutions the layers are spread over (top ``grid``,
        doubling each level; S / finest grid must be a power of two >= 2).
        num_codes: K per layer. code_dim: D. grid: side of the top layers' grid.
        hidden: channels of the state and the conv stacks. res_blocks: residual blocks in the
        bottom-up stem and the decoder. codebook_init, restart_threshold: see :class:`Codebook`.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        likelihood: Likelihood,
        num_layers: int = 4,
        levels: int = 1,
        num_codes: int = 64,
        code_dim: int = 16,
        grid: int = 7,
        hidden: int = 64,
        res_blocks: int = 2,
        codebook_init: str = "kmeans",
        restart_threshold: float = 0.0,
    ) -> None:
        super().__init__(image_shape, likelihood)
        channels, side, _ = self.image_shape
        if not 1 <= num_layers <= MAX_LAYERS:
            raise ValueError(f"num_layers: expected 1 to {MAX_LAYERS} layers, got {num_layers}")
        if not 1 <= levels <= num_layers:
            raise ValueError(f"levels: expected 1 to num_layers={num_layers} resolutions, got {levels}")
        grids = [grid * 2**level for level in range(levels)]
        if grids[-1] >= side:
            raise ValueError(
                f"levels: {levels} resolutions from grid {grid} reach {grids[-1]}, not below the "
                f"image side {side}"
            )
        self.encoder = BottomUp(channels, hidden, side, grids, res_blocks)
        self.top = nn.Parameter(torch.zeros(1, hidden, grid, grid))
        layers, number = [], num_layers
        for level, count in enumerate(layers_per_level(num_layers, levels)):
            for index in range(count):
                space = Codebook(num_codes, code_dim, codebook_init, restart_threshold)
                site = CodeSite(f"z{number}", space, (grids[level], grids[level]))
                upsample = level > 0 and index == 0
                layers.append(
                    TopDownLayer(site, hidden, hidden // 2 or 1, level, upsample, num_layers**-0.5)
                )
                number -= 1
        self.layers = nn.ModuleList(layers)
        self.decoder = conv_decoder(hidden, hidden, self.out_channels, side, grids[-1], res_blocks)

    @property
    def code_sites(self) -> list[CodeSite]:
        """The layers' sites, top first (``z{L}`` ... ``z1``)."""
        return [layer.site for layer in self.layers]

    def _descend(self, batch: int, bottom_up: list[Tensor] | None) -> Tensor:
        """The top-down pass: draw (or infer, given ``bottom_up``) every layer; the final state."""
        h = self.top.expand(batch, -1, -1, -1)
        for layer in self.layers:
            if layer.upsample:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            prior = layer.prior_logits(h)
            features = None if bottom_up is None else layer.features(h, bottom_up[layer.level])
            h = layer.update(h, code(layer.site, prior, features))
        return h
