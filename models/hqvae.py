"""HQ-VAE (Takida et al. 2024): a top-down stack of injected and residual layers of codes.

A stack of ``L`` layers, numbered from the top, each of one of two kinds:

* **injected**: the layer opens a new, finer resolution (``grid``, ``2 grid``, ...); its codes enter
  the top-down state there, after the state of the layers above has been upsampled, and its
  posterior reads the bottom-up feature at that resolution with that state (VQ-VAE-2's bottom
  encoder conditioned on the decoded top);
* **residual**: the layer joins the resolution of the layer above and quantises what the layers
  above it left of the same feature, ``r_{l+1} = r_l - e_{z_l}``; the state reads the sum (RQ-VAE).

So a stack is a sequence of *levels*, one per resolution, each holding a code group of one or more
residual depths. Generative story, for each image x, levels ``g = 1 .. G`` top first::

    h_0 = c                                          a learned constant state
    z_l ~ p(z_l)                                     every layer l of level g, every position
    h_g = block_g(up(h_{g-1}) + inject_g(sum_{l in g} e_{z_l}))
    x   ~ p(x | decoder(h_G))

with ``p(z_l)`` uniform (HQ-VAE's first stage) or learned logits per position. The guide runs the
same top-down path on its own codes, with features ``zhat_g = posterior_g(up(h_{g-1}), a_g(x))`` for
the level's group::

    VQ-VAE-2 = injected,injected with vq          SQ-VAE-2 = injected,injected with sq
    RQ-VAE   = residual,residual,... with vq      RSQ-VAE  = residual,residual,... with sq

and any mix, e.g. ``injected,residual,injected``. How q is formed is the guide family's choice
(hard VQ, stochastic quantisation with a learned variance ``s_l^2`` per layer, responsibilities,
...), never the model's. A stack whose first layer is ``residual`` starts its first level with it.

Sites are named ``z1`` (top) ... ``zL``; a level of several layers is the code group ``g{index}``.
Codebooks are one per layer, or one shared by all layers (``shared_codebook``, as RQ-VAE shares
its codebook across depths).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from probvq.codebook import Codebook
from probvq.imagemodel import TopDownModel
from probvq.likelihoods import Likelihood
from probvq.nets import BottomUp, Residual, conv_decoder
from probvq.sites import CodeGroup, CodeSite, code

KINDS = ("injected", "residual")
PRIORS = ("uniform", "learned")


def parse_layers(layers: str | Sequence[str]) -> list[str]:
    """The layer kinds of a stack, top first, from ``"injected,residual"`` or a sequence."""
    kinds = [k.strip() for k in layers.split(",")] if isinstance(layers, str) else list(layers)
    if not kinds or any(kind not in KINDS for kind in kinds):
        raise ValueError(
            f"layers: expected a comma-separated list of {' / '.join(KINDS)}, top first, got {layers!r}"
        )
    return kinds


def levels_of(kinds: Sequence[str]) -> list[int]:
    """How many layers each level (resolution) holds: an injected layer below the top opens one."""
    counts: list[int] = []
    for index, kind in enumerate(kinds):
        if index == 0 or kind == "injected":
            counts.append(1)
        else:
            counts[-1] += 1
    return counts


class Level(nn.Module):
    """One resolution of the stack: its code group, posterior head and state update.

    Args:
        codes: a site, or a group of residual depths. hidden: channels of the state.
        learned_prior: learn logits per position and layer (else uniform).
    """

    def __init__(self, codes: CodeSite | CodeGroup, hidden: int, learned_prior: bool) -> None:
        super().__init__()
        sites = list(codes.sites) if isinstance(codes, CodeGroup) else [codes]
        first = sites[0]
        code_dim = first.space.value_shape.numel()
        self.codes, self.sites = codes, sites
        # A single projection, as at the end of the VQ-VAE encoder: a deeper head starts with
        # features that barely differ between images, and a stochastic quantiser's q stays uniform.
        self.posterior = nn.Sequential(nn.ReLU(), nn.Conv2d(2 * hidden, code_dim, 1))
        self.inject = nn.Conv2d(code_dim, hidden, 1)
        self.block = Residual(hidden, hidden // 2 or 1)
        shape = (len(sites), *first.grid, first.num_codes)
        self.prior_logits = nn.Parameter(torch.zeros(shape)) if learned_prior else None

    def prior(self, batch: int) -> Tensor | list[Tensor]:
        """``(B, G, G, K)`` logits of ``p(z_l)``: one tensor for a site, a list for a group."""
        if self.prior_logits is None:
            logits = [site.uniform_logits((batch,)) for site in self.sites]
        else:
            logits = [layer.expand(batch, *layer.shape) for layer in self.prior_logits]
        return logits if isinstance(self.codes, CodeGroup) else logits[0]

    def features(self, h: Tensor, bottom_up: Tensor) -> Tensor:
        """``(B, G, G, D)``: what the level's group quantises, from the state and ``a_g(x)``."""
        return self.posterior(torch.cat([h, bottom_up], 1)).movedim(1, -1)

    def update(self, h: Tensor, value: Tensor) -> Tensor:
        return self.block(h + self.inject(value.movedim(-1, 1)))


class HQVAE(TopDownModel):
    """A stack of injected and residual code layers (see the module).

    Args:
        image_shape: ``(C, S, S)``. likelihood: the observation model.
        layers: kinds top first, ``"injected,injected"`` or a sequence of ``"injected"`` /
            ``"residual"``; at least one layer.
        num_codes: K per layer. code_dim: D. grid: side of the top level's grid (each further
            level doubles it; S / the finest grid must be a power of two >= 2).
        hidden: channels of the state and conv stacks. res_blocks: residual blocks of the bottom-up
            stem and the decoder. prior: ``"uniform"`` or ``"learned"``.
        shared_codebook: one codebook for every layer. codebook_init, restart_threshold: see
            :class:`~probvq.Codebook`.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        likelihood: Likelihood,
        layers: str | Sequence[str] = "injected,injected",
        num_codes: int = 64,
        code_dim: int = 16,
        grid: int = 7,
        hidden: int = 64,
        res_blocks: int = 2,
        prior: str = "uniform",
        shared_codebook: bool = False,
        codebook_init: str = "kmeans",
        restart_threshold: float = 0.0,
    ) -> None:
        super().__init__(image_shape, likelihood)
        if prior not in PRIORS:
            raise ValueError(f"prior: expected one of {PRIORS}, got {prior!r}")
        self.kinds = parse_layers(layers)
        counts = levels_of(self.kinds)
        channels, side, _ = self.image_shape
        grids = [grid * 2**level for level in range(len(counts))]
        if grids[-1] >= side:
            raise ValueError(
                f"layers: {len(counts)} injected resolutions from grid {grid} reach {grids[-1]}, "
                f"not below the image side {side} (use residual layers or a smaller --grid)"
            )
        # Built (and its table drawn) even when unused, so the README's HQ-VAE runs reproduce.
        shared = Codebook(num_codes, code_dim, codebook_init, restart_threshold)
        number, levels = 1, []
        for index, (count, side_g) in enumerate(zip(counts, grids, strict=True)):
            sites = []
            for _ in range(count):
                space = (
                    shared
                    if shared_codebook
                    else Codebook(num_codes, code_dim, codebook_init, restart_threshold)
                )
                sites.append(CodeSite(f"z{number}", space, (side_g, side_g)))
                number += 1
            codes = sites[0] if count == 1 else CodeGroup(f"g{index + 1}", sites)
            levels.append(Level(codes, hidden, prior == "learned"))
        self.levels = nn.ModuleList(levels)
        self.encoder = BottomUp(channels, hidden, side, grids, res_blocks)
        self.top = nn.Parameter(torch.zeros(1, hidden, grid, grid))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1) for _ in grids[1:]
        )
        self.decoder = conv_decoder(hidden, hidden, self.out_channels, side, grids[-1], res_blocks)

    @property
    def code_sites(self) -> list[CodeSite]:
        """Every layer's site, top first (``z1`` ... ``zL``)."""
        return [site for level in self.levels for site in level.sites]

    def _descend(self, batch: int, bottom_up: list[Tensor] | None) -> Tensor:
        """The top-down pass over the levels: draw (or, given ``bottom_up``, infer) every layer."""
        h = self.top.expand(batch, -1, -1, -1)
        for index, level in enumerate(self.levels):
            if index > 0:
                h = self.up[index - 1](h)
            features = None if bottom_up is None else level.features(h, bottom_up[index])
            h = level.update(h, code(level.codes, level.prior(batch), features))
        return h
