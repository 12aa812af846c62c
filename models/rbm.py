"""RBM-prior hybrid: binary latents under a restricted Boltzmann machine and a deep decoder.

Hu, Salakhutdinov et al., "Learning Deep Generative Models With Discrete Latent Variables" (2018):
an undirected graphical model (an RBM) over binary latents as the prior of a deep directed decoder,
trained in two stages. Generative story, for each image x::

    h ~ p(h) = exp(-F(h)) / Z     h in {0, 1}^D; F the free energy of an RBM whose M hidden
                                  units are summed out (probvq.rbm)
    x ~ p(x | g_theta(h))         an MLP decoder and a likelihood

The guide declares the same site with one logit per unit from an MLP encoder, a factorised
Bernoulli ``q(h | x)``; the ``bernoulli`` family relaxes it (straight-through by default, so the free
energy is read at hard units) and draws it exactly for evaluation.

Only the paper's abstract was at hand; the details below are this implementation's choices.
``stage`` selects what the program trains:

* ``pretrain``: the prior is factorial, ``p(h) = prod_i Bernoulli(h_i; sigmoid(b_i))`` with learned
  ``b``, i.e. an RBM with ``W = 0``; encoder and decoder learn a code under it.
* ``rbm``: encoder and decoder are frozen and only the RBM learns. The ELBO's gradient with respect
  to the RBM is ``E_{x, q(h|x)}[-grad F(h)] - grad log Z``: maximum likelihood on the training set's
  posterior codes, with ``grad log Z`` from persistent chains (PCD). :meth:`start_stage` starts the
  RBM at the factorial prior (visible biases ``b``, small random ``W``), so it begins where the
  first stage ended.
* ``joint``: everything trains together through the ELBO, the RBM by PCD.
"""

from __future__ import annotations

import pyro
import torch
from torch import Tensor, nn

from probvq.imagemodel import ImageModel
from probvq.likelihoods import Likelihood
from probvq.nets import mlp
from probvq.priors import Prior
from probvq.rbm import RBMPrior
from probvq.sites import DATA_PLATE, CodeSite, code
from probvq.spaces import BinaryUnits

STAGES = ("pretrain", "rbm", "joint")
ENERGY_STAGES = ("rbm", "joint")
"""The stages whose prior is the RBM's energy (``pretrain``'s is factorial logits)."""


class RBMVAE(ImageModel):
    """Binary latents ``h`` (D units) with an RBM prior (M hidden units) and MLP encoder/decoder.

    Args:
        image_shape: ``(C, S, S)``. likelihood: the observation model.
        latent_units: D. rbm_hidden: M.
        hidden: width of the two hidden layers of the encoder and of the decoder.
        stage: ``pretrain``, ``rbm`` or ``joint`` (module docstring).
        pcd_chains, gibbs_sweeps: persistent chains and sweeps per step (PCD-k).
        ais_chains, ais_steps: AIS for ``log Z`` at evaluation (exact when min(D, M) <= 20).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        likelihood: Likelihood,
        latent_units: int = 200,
        rbm_hidden: int = 200,
        hidden: int = 512,
        stage: str = "joint",
        pcd_chains: int = 100,
        gibbs_sweeps: int = 1,
        ais_chains: int = 100,
        ais_steps: int = 1000,
    ) -> None:
        super().__init__(image_shape, likelihood)
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
        pixels = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        self.encoder = mlp([pixels, hidden, hidden, latent_units])
        self.decoder = mlp([latent_units, hidden, hidden, pixels * self.likelihood.channels_per_input])
        self.h = CodeSite("h", BinaryUnits(), (latent_units,))
        self.factorial = nn.Parameter(torch.zeros(latent_units))
        self.energy = RBMPrior(latent_units, rbm_hidden, pcd_chains, gibbs_sweeps, ais_chains, ais_steps)
        self.stage = stage
        self.energy.active = stage in ENERGY_STAGES
        if stage == "rbm":
            for net in (self.encoder, self.decoder):
                net.requires_grad_(False)
            self.factorial.requires_grad_(False)

    @property
    def code_sites(self) -> list[CodeSite]:
        return [self.h]

    def data_encoders(self) -> tuple[nn.Module, ...]:
        return (self.encoder,)

    def start_stage(self) -> None:
        """Begin this model's stage afresh: the RBM stage starts from the factorial prior."""
        if self.stage == "rbm":
            with torch.no_grad():
                self.energy.rbm.visible_bias.copy_(self.factorial)
            self.energy.reset_chains(torch.sigmoid(self.factorial))

    def prior(self, batch_size: int) -> Prior:
        if self.stage == "pretrain":
            logits = torch.stack([torch.zeros_like(self.factorial), self.factorial], -1)
            return logits.expand(batch_size, *logits.shape)
        return self.energy.prior()

    def model(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            h = code(self.h, self.prior(x.shape[0]))
            out = self.decoder(h).view(-1, self.out_channels, *self.image_shape[1:])
            pyro.sample("x", self.likelihood(out), obs=x)

    def guide(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            code(self.h, self.prior(x.shape[0]), features=self.encoder(x.flatten(1)))
