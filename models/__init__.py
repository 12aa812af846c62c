"""Generative stories written against the code-site protocol (installed as ``probvq.models``)."""

from .deep import DeepVAE
from .hqvae import HQVAE
from .rbm import RBMVAE
from .vqvae import VQVAE

__all__ = ["HQVAE", "RBMVAE", "VQVAE", "DeepVAE"]
