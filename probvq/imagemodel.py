"""What the zoo's image models share: shape and data checks, and the top-down model/guide pair."""

from __future__ import annotations

import pyro
from torch import Tensor, nn

from probvq.likelihoods import Likelihood
from probvq.sites import DATA_PLATE


class ImageModel(nn.Module):
    """Base of the zoo's models: ``image_shape`` ``(C, S, S)`` and the ``likelihood`` of x.

    ``out_channels`` is what a decoder must produce for the likelihood (e.g. two per channel for the
    discretised logistic's location and scale).
    """

    def __init__(self, image_shape: tuple[int, int, int], likelihood: Likelihood) -> None:
        super().__init__()
        channels, side, width = image_shape
        if side != width:
            raise ValueError(f"image_shape: expected square images, got {image_shape}")
        self.likelihood = likelihood
        self.image_shape = (channels, side, width)

    @property
    def out_channels(self) -> int:
        return self.image_shape[0] * self.likelihood.channels_per_input

    def check_data(self, x: Tensor, name: str = "x") -> None:
        """Refuse data that is not a batch of prepared images of this model's shape."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{name}: expected images of shape {self.image_shape}, got {tuple(x.shape)}"
            )
        self.likelihood.check_prepared(x, name)


class TopDownModel(ImageModel):
    """An image model whose model and guide walk one top-down path over its code layers.

    Subclasses define ``encoder`` (x to the bottom-up features), ``decoder`` (the final state to the
    likelihood's parameters) and ``_descend(batch, bottom_up)``, the top-down pass that draws every
    layer from its prior when ``bottom_up`` is ``None`` (the model) and infers it from the features
    otherwise (the guide), returning the final state. Prior and posterior then share the path.
    """

    encoder: nn.Module
    decoder: nn.Module

    def _descend(self, batch: int, bottom_up: list[Tensor] | None) -> Tensor:
        raise NotImplementedError

    def data_encoders(self) -> tuple[nn.Module, ...]:
        """The bottom-up network: in eval mode a per-row function of the data."""
        return (self.encoder,)

    def model(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            h = self._descend(x.shape[0], None)
            pyro.sample("x", self.likelihood(self.decoder(h)), obs=x)

    def guide(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            self._descend(x.shape[0], self.encoder(x))
