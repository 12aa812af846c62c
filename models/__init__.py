"""Generative stories written against the code-site protocol (installed as ``probvq.models``)."""

from .vqvae import VQVAE

__all__ = ["VQVAE"]
