"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning") as a Pyro program.

Generative story, for each image x::

    z_n ~ p(z_n)              for every position n of a G x G grid, z_n in {e_1, ..., e_K}
    x   ~ p(x | g_theta(z))   a conv decoder and a likelihood (Bernoulli, discretised logistic, ...)

p(z_n) is uniform (the paper's first stage, KL = log K per position under hard VQ), a learned
categorical per position, or a gated PixelCNN over the grid, ``p(z) = prod_n p(z_n | z_<n)``, trained
jointly with the rest through the ELBO's rate (the paper fits it in a second stage instead:
``probvq fit-prior``). The guide declares the same site with encoder features
``zhat = f_phi(x)``; which posterior that implies (hard VQ, stochastic quantisation, relaxed
responsibilities, ...) is the guide family's choice, not the model's.
"""

from __future__ import annotations

import pyro
import torch
from torch import Tensor, nn

from probvq.codebook import Codebook
from probvq.imagemodel import ImageModel
from probvq.likelihoods import Likelihood
from probvq.nets import conv_decoder, conv_encoder
from probvq.pixelcnn import GatedPixelCNN
from probvq.priors import Prior
from probvq.sites import DATA_PLATE, CodeSite, code

PRIORS = ("uniform", "learned", "pixelcnn")


class VQVAE(ImageModel):
    """One grid of codes between a conv encoder and decoder.

    Args:
        image_shape: ``(C, S, S)``.
        likelihood: the observation model.
        num_codes: K. code_dim: D. grid: G (S / G must be a power of two).
        hidden: channels of the conv stacks. res_blocks: residual blocks per stack.
        prior: ``"uniform"``, ``"learned"`` (logits per position) or ``"pixelcnn"`` (a
            :class:`~probvq.pixelcnn.GatedPixelCNN` of ``prior_hidden`` channels and ``prior_layers``
            layers), the last two trained with the ELBO.
        codebook_init: see :class:`probvq.Codebook`. restart_threshold: dead-code restarts.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        likelihood: Likelihood,
        num_codes: int = 64,
        code_dim: int = 16,
        grid: int = 7,
        hidden: int = 64,
        res_blocks: int = 2,
        prior: str = "uniform",
        codebook_init: str = "kmeans",
        restart_threshold: float = 0.0,
        prior_hidden: int = 64,
        prior_layers: int = 8,
    ) -> None:
        super().__init__(image_shape, likelihood)
        if prior not in PRIORS:
            raise ValueError(f"prior: expected one of {PRIORS}, got {prior!r}")
        channels, side, _ = self.image_shape
        self.encoder = conv_encoder(channels, hidden, code_dim, side, grid, res_blocks)
        self.decoder = conv_decoder(code_dim, hidden, self.out_channels, side, grid, res_blocks)
        self.z = CodeSite(
            "z", Codebook(num_codes, code_dim, codebook_init, restart_threshold), (grid, grid)
        )
        self.prior_logits = (
            nn.Parameter(torch.zeros(grid, grid, num_codes)) if prior == "learned" else None
        )
        self.pixelcnn = (
            GatedPixelCNN(num_codes, code_dim, prior_hidden, prior_layers)
            if prior == "pixelcnn"
            else None
        )

    @property
    def codebook(self) -> Codebook:
        return self.z.space

    @property
    def code_sites(self) -> list[CodeSite]:
        return [self.z]

    def data_encoders(self) -> tuple[nn.Module, ...]:
        """The encoder: in eval mode the features of image i depend on image i alone."""
        return (self.encoder,)

    def prior(self, batch_size: int) -> Prior:
        if self.pixelcnn is not None:
            return self.pixelcnn
        if self.prior_logits is None:
            return self.z.uniform_logits((batch_size,))
        return self.prior_logits.expand(batch_size, *self.prior_logits.shape)

    def model(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z = code(self.z, self.prior(x.shape[0]))
            pyro.sample("x", self.likelihood(self.decoder(z.movedim(-1, 1))), obs=x)

    def guide(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            zhat = self.encoder(x).movedim(1, -1)
            code(self.z, self.prior(x.shape[0]), features=zhat)
