"""Observation models p(x | decoder output) for images ``(C, H, W)``.

Each likelihood says which raw data it accepts (:meth:`Likelihood.check`), how raw data becomes the
model's input (:meth:`Likelihood.prepare`), how many decoder channels it reads per image channel,
and builds a distribution with the image as one event. The data is checked once, before training,
so the per-step distributions skip Pyro's sample validation (a full pass over every batch).

* :class:`Bernoulli`: binary pixels; nats per example.
* :class:`DiscretisedLogistic`: 8-bit pixels in 256 bins (Salimans et al. 2017, PixelCNN++),
  so ``nats / (C H W ln 2)`` is bits/dim in the field's convention.
* :class:`Gaussian`: real pixels with a learned per-channel variance (a density, not a mass).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch import Tensor, nn
from torch.distributions import constraints


def _check_finite_nonempty(x: Tensor, name: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name}: the data is empty")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name}: the data contains NaN or infinite values")


def _image(pixels: TorchDistribution) -> TorchDistribution:
    """Pixels ``(B, C, H, W)`` as one event per image, without re-checking checked data."""
    return dist.Independent(pixels, 3, validate_args=False)


LOW_PRECISION = (torch.float16, torch.bfloat16)


class Likelihood(nn.Module):
    """Abstract base of observation models."""

    channels_per_input: int = 1
    display_range: tuple[float, float] | None = None
    """The range of prepared values (and means) shown as black to white; ``None``: min to max."""

    def check(self, x: Tensor, name: str = "data") -> None:
        """Raise ``ValueError`` naming ``name`` if raw data ``x`` is not of this likelihood's kind."""
        raise NotImplementedError

    def prepare(self, x: Tensor) -> Tensor:
        """Raw data to the float tensor the model conditions on."""
        raise NotImplementedError

    def check_prepared(self, x: Tensor, name: str = "x") -> None:
        """Raise ``ValueError`` naming ``name`` if ``x`` is not prepared data of this likelihood."""
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected prepared float data, got dtype {x.dtype}")
        _check_finite_nonempty(x, name)

    def forward(self, out: Tensor) -> TorchDistribution:
        raise NotImplementedError

    def __call__(self, out: Tensor) -> TorchDistribution:
        # A log-density is a sum over every pixel: under bf16/fp16 autocast it is scored in float32.
        return super().__call__(out.float() if out.dtype in LOW_PRECISION else out)


class Bernoulli(Likelihood):
    """``x_i ~ Bernoulli(sigmoid(out_i))`` for binary pixels."""

    display_range = (0.0, 1.0)

    def check(self, x: Tensor, name: str = "data") -> None:
        _check_finite_nonempty(x, name)
        if not ((x == 0) | (x == 1)).all():
            raise ValueError(
                f"{name}: the Bernoulli likelihood needs binary data (values 0 and 1); got values "
                f"in [{float(x.min())}, {float(x.max())}] — binarise the data or choose another "
                "likelihood"
            )

    def prepare(self, x: Tensor) -> Tensor:
        return x.float()

    def check_prepared(self, x: Tensor, name: str = "x") -> None:
        super().check_prepared(x, name)
        self.check(x, name)

    def forward(self, out: Tensor) -> TorchDistribution:
        return _image(dist.Bernoulli(logits=out, validate_args=False))


class DiscretisedLogisticDistribution(TorchDistribution):
    """A logistic discretised to ``bins`` equal bins on ``[-1, 1]``, per pixel.

    ``P(x) = sigmoid((x + h - mu) / s) - sigmoid((x - h - mu) / s)`` with half-bin ``h = 1/(bins-1)``;
    the edge bins take all mass below ``-1 + h`` and above ``1 - h`` (Salimans et al. 2017).
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = constraints.interval(-1.0, 1.0)

    def __init__(self, loc: Tensor, log_scale: Tensor, bins: int = 256, validate_args=None):
        self.loc, self.log_scale = torch.broadcast_tensors(loc, log_scale)
        self.bins = bins
        super().__init__(self.loc.shape, validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        return self.loc.clamp(-1.0, 1.0)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return DiscretisedLogisticDistribution(
            self.loc.expand(batch_shape), self.log_scale.expand(batch_shape), self.bins
        )

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        half = 1.0 / (self.bins - 1)
        inv_s = torch.exp(-self.log_scale)
        centred = value - self.loc
        upper = inv_s * (centred + half)
        lower = inv_s * (centred - half)
        log_cdf_upper = nn.functional.logsigmoid(upper)
        log_survival_lower = nn.functional.logsigmoid(-lower)
        # sigmoid(u) - sigmoid(l) = sigmoid(u) sigmoid(-l) (1 - exp(-(u - l))): every factor is
        # computed in log space, so tiny bins far in the tails do not underflow to log 0.
        log_mass = log_cdf_upper + log_survival_lower + torch.log(-torch.expm1(lower - upper))
        edge_low = value < -1.0 + half
        edge_high = value > 1.0 - half
        return torch.where(edge_low, log_cdf_upper, torch.where(edge_high, log_survival_lower, log_mass))

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            u = torch.rand(shape, device=self.loc.device).clamp(1e-5, 1 - 1e-5)
            x = self.loc.expand(shape) + torch.exp(self.log_scale.expand(shape)) * (
                torch.log(u) - torch.log1p(-u)
            )
            levels = torch.round((x.clamp(-1.0, 1.0) + 1.0) / 2.0 * (self.bins - 1))
            return levels / (self.bins - 1) * 2.0 - 1.0


class DiscretisedLogistic(Likelihood):
    """8-bit pixels (0..255) mapped to ``[-1, 1]``, with a per-pixel discretised logistic."""

    display_range = (-1.0, 1.0)

    channels_per_input = 2

    def check(self, x: Tensor, name: str = "data") -> None:
        _check_finite_nonempty(x, name)
        if x.is_floating_point() and not (x == x.round()).all():
            raise ValueError(f"{name}: 8-bit data must hold integer levels 0..255")
        if float(x.min()) < 0 or float(x.max()) > 255:
            raise ValueError(
                f"{name}: 8-bit data must lie in 0..255, got [{float(x.min())}, {float(x.max())}]"
            )

    def prepare(self, x: Tensor) -> Tensor:
        return x.float() / 127.5 - 1.0

    def check_prepared(self, x: Tensor, name: str = "x") -> None:
        super().check_prepared(x, name)
        if float(x.min()) < -1.0 or float(x.max()) > 1.0:
            raise ValueError(f"{name}: prepared 8-bit data must lie in [-1, 1] (see prepare)")

    def forward(self, out: Tensor) -> TorchDistribution:
        loc, log_scale = out.chunk(2, dim=1)
        scale = log_scale.clamp_min(-7.0)
        return _image(DiscretisedLogisticDistribution(loc, scale, validate_args=False))


class Gaussian(Likelihood):
    """``x ~ N(out, sigma_c^2)`` with a learned log-variance per channel, for real-valued data."""

    def __init__(self, channels: int, init_log_var: float = 0.0) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.full((channels, 1, 1), float(init_log_var)))

    def check(self, x: Tensor, name: str = "data") -> None:
        _check_finite_nonempty(x, name)

    def prepare(self, x: Tensor) -> Tensor:
        return x.float()

    def forward(self, out: Tensor) -> TorchDistribution:
        scale = torch.exp(0.5 * self.log_var)
        return _image(dist.Normal(out, scale, validate_args=False))


LIKELIHOODS = {"bernoulli": "binary", "logistic": "8bit", "gaussian": "real"}
"""Likelihood names and the data kind each one models."""


def likelihood_for(data_kind: str) -> str:
    """The likelihood name that models ``data_kind`` data."""
    for name, kind in LIKELIHOODS.items():
        if kind == data_kind:
            return name
    raise ValueError(f"data_kind: expected one of {sorted(LIKELIHOODS.values())}, got {data_kind!r}")


def make_likelihood(name: str, data_kind: str, channels: int) -> Likelihood:
    """Build a likelihood by name; ``"auto"`` picks the one matching ``data_kind``."""
    if name == "auto":
        name = likelihood_for(data_kind)
    if name == "bernoulli":
        return Bernoulli()
    if name == "logistic":
        return DiscretisedLogistic()
    if name == "gaussian":
        return Gaussian(channels)
    raise ValueError(f"likelihood: expected 'auto' or one of {sorted(LIKELIHOODS)}, got {name!r}")


def bits_per_dim(nats: float, dims: int) -> float:
    """Convert nats per example to bits per dimension, ``nats / (dims ln 2)``."""
    return nats / (dims * math.log(2.0))
