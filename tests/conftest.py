"""Shared fixtures: seeding, and a model small enough to enumerate exactly."""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import Tensor, nn

from probvq import DATA_PLATE, BinaryUnits, Codebook, CodeSite, code
from probvq.inference import FAMILIES


def families_for(space) -> list[str]:
    """The registered families that accept a site over ``space`` and sample it in a guide (every
    one, as they arrive)."""
    site = CodeSite("probe", space, (1,))
    names = []
    for name, spec in FAMILIES.items():
        if getattr(spec.cls, "sums_out_codes", False):  # no guide to sample: tests of its own
            continue
        try:
            spec.build([site])
        except ValueError:
            continue
        names.append(name)
    return names


CODEBOOK_FAMILIES = families_for(Codebook(3, 2, init="normal"))
BINARY_FAMILIES = families_for(BinaryUnits())


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield


class TinyVAE(nn.Module):
    """x in {0,1}^X from N code positions with K codes of dimension D: K^N configurations.

    A non-uniform learned prior per position, an MLP decoder and a linear encoder.
    """

    def __init__(self, num_codes: int = 3, dim: int = 2, positions: int = 2, x_dim: int = 6):
        super().__init__()
        self.codebook = Codebook(num_codes, dim, init="normal")
        self.z = CodeSite("z", self.codebook, (positions,))
        self.prior_logits = nn.Parameter(torch.randn(positions, num_codes))
        self.decoder = nn.Sequential(nn.Linear(positions * dim, 16), nn.Tanh(), nn.Linear(16, x_dim))
        self.encoder = nn.Linear(x_dim, positions * dim)
        self.positions, self.dim = positions, dim

    @property
    def code_sites(self) -> list[CodeSite]:
        return [self.z]

    def prior(self, batch: int) -> Tensor:
        return self.prior_logits.expand(batch, *self.prior_logits.shape)

    def model(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z = code(self.z, self.prior(x.shape[0]))
            logits = self.decoder(z.flatten(-2))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            zhat = self.encoder(x).view(x.shape[0], self.positions, self.dim)
            code(self.z, self.prior(x.shape[0]), features=zhat)

    def configurations(self) -> Tensor:
        """All K^N code index tuples, shape (K^N, N)."""
        k, n = self.codebook.num_codes, self.positions
        return torch.tensor(list(itertools.product(range(k), repeat=n)))

    def log_joint(self, x: Tensor) -> Tensor:
        """``log p(x, z=c)`` for every configuration c: shape (K^N, B), read from the model."""
        rows = []
        for config in self.configurations():
            value = self.codebook.code_of_index(config).expand(x.shape[0], -1, -1)
            conditioned = poutine.condition(self.model, data={"z": value})
            trace = poutine.trace(conditioned).get_trace(x)
            trace.compute_log_prob()
            rows.append(trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"])
        return torch.stack(rows)

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` by enumeration, shape (B,)."""
        return torch.logsumexp(self.log_joint(x), 0)


@pytest.fixture
def tiny() -> TinyVAE:
    return TinyVAE()


@pytest.fixture
def tiny_data() -> Tensor:
    return torch.bernoulli(torch.full((5, 6), 0.4))


def built_run(settings: dict, family: str, **overrides):
    """Config, model, family and prepared train/valid data of a built-in-data run, seeded."""
    from probvq.build import build, load_data, resolve
    from probvq.config import RunConfig

    config = RunConfig(family=family, **{**settings, **overrides})
    dataset = load_data(config)
    config = resolve(config, dataset)
    pyro.set_rng_seed(config.seed)
    vae, fam = build(config, dataset)
    prepare = vae.likelihood.prepare
    return config, vae, fam, prepare(dataset.train), prepare(dataset.valid)
