"""What every model of square images under a likelihood shares: its shape and its data checks."""

from __future__ import annotations

from torch import Tensor, nn

from probvq.likelihoods import Likelihood


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
