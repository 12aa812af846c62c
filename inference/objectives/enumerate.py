"""Exact summation over every configuration of a model's codes, for small code spaces.

With ``C = prod_s K_s^{N_s}`` configurations ``c`` of all code sites ``s`` (K codes at each of N
positions), the marginal likelihood is a finite sum::

    log p(x) = logsumexp_c [log p(z = c) + log p(x | z = c)]

computed here by running the model once per configuration under ``poutine.condition`` (any model,
whatever its networks: nothing needs to broadcast over an enumeration dimension, which the conv
nets of the zoo do not, and which Pyro's parallel enumeration in ``TraceEnum_ELBO`` requires).
With the exact posterior ``w_c = p(z = c | x)`` the bound is tight and splits into

    distortion = sum_c w_c (-log p(x | z = c))
    rate       = KL(p(z | x) || p(z)) = sum_c w_c log(w_c / p(z = c))

whose sum is ``-log p(x)``. For training both are written with the weights held constant and
``log w_c = log p(x, z = c) - log p(x)`` from the log-sum-exp (never ``log`` of an underflowed
weight)::

    distortion = sum_c sg(w_c) (-log p(x | z = c))
    rate       = sum_c sg(w_c) (log p(x | z = c) - log p(x))

so their values are the two terms above, each finite when a weight underflows to 0, and the
gradient of their sum is exactly ``-grad log p(x)`` (``sum_c w_c = 1`` cancels the rest).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from probvq.factors import RATE_OF
from probvq.sites import CodeSite

from .terms import per_example, reconstruction_error


def configurations(sites: Sequence[CodeSite], limit: int) -> int:
    """The number of joint configurations of ``sites``, refused above ``limit`` with its size."""
    exponent = sum(math.prod(site.grid) * math.log10(site.num_codes) for site in sites)
    if exponent > math.log10(limit) + 1e-9:
        parts = ", ".join(f"{site.name}: {site.num_codes}^{math.prod(site.grid)}" for site in sites)
        raise ValueError(
            f"enumerate: the codes span about 10^{exponent:.1f} configurations ({parts}); exact "
            f"summation takes at most {limit} (max_configurations): use a smaller grid or K, or "
            "another family"
        )
    return round(10**exponent)


def _index_tuples(sites: Sequence[CodeSite]) -> Iterator[tuple[int, ...]]:
    return itertools.product(*(range(s.num_codes) for s in sites for _ in range(math.prod(s.grid))))


@dataclass
class Enumerated:
    """Per configuration and example: ``log p(z = c)`` and ``log p(x | z = c)`` ``(C, B)``, the
    likelihood's mean squared error ``(C, B)`` (``None`` without a mean), the code indices of each
    configuration per site, the names of the observed sites and their values per example."""

    log_prior: Tensor
    log_likelihood: Tensor
    squared_error: Tensor | None
    indices: dict[str, Tensor]
    observed: tuple[str, ...]
    observed_dims: int

    @property
    def log_joint(self) -> Tensor:
        return self.log_prior + self.log_likelihood

    @property
    def log_marginal(self) -> Tensor:
        return torch.logsumexp(self.log_joint, 0)

    @property
    def posterior(self) -> Tensor:
        return torch.softmax(self.log_joint, 0)

    def _expected(self, value: Tensor) -> Tensor:
        """``sum_c sg(w_c) value_c``, with the configurations of weight 0 left out (their value may
        be infinite)."""
        w = self.posterior.detach()
        return torch.where(w > 0, w * value, torch.zeros_like(value)).sum(0)

    def distortion(self) -> Tensor:
        return self._expected(-self.log_likelihood)

    def rate(self) -> Tensor:
        return self._expected(self.log_likelihood - self.log_marginal)


def enumerate_model(model: Callable, sites: Sequence[CodeSite], x: Tensor, limit: int) -> Enumerated:
    """Run ``model(x)`` under every configuration of ``sites`` (see the module)."""
    configurations(sites, limit)
    names = {site.name for site in sites}
    priors, likelihoods, errors = [], [], []
    indices: dict[str, list[Tensor]] = {site.name: [] for site in sites}
    for config in _index_tuples(sites):
        data, start = {}, 0
        for site in sites:
            size = math.prod(site.grid)
            index = torch.tensor(config[start : start + size], device=x.device).view(site.grid)
            start += size
            indices[site.name].append(index)
            data[site.name] = site.space.code_of_index(index.expand(x.shape[0], *site.grid))
        trace = prune_subsample_sites(poutine.trace(poutine.condition(model, data=data)).get_trace(x))
        log_prior, log_likelihood, observed, dims = 0.0, 0.0, [], 0
        for name, node in trace.nodes.items():
            if node["type"] != "sample":
                continue
            if not node["is_observed"]:
                raise ValueError(f"site {name!r}: enumerate sums over code sites only; it is a latent")
            value = per_example(node["fn"].log_prob(node["value"]), node)
            if name in names or node["infer"].get(RATE_OF):
                log_prior = log_prior + value
            else:
                log_likelihood = log_likelihood + value
                observed.append(name)
                dims += node["fn"].event_shape.numel()
        priors.append(log_prior)
        likelihoods.append(log_likelihood)
        with contextlib.suppress(ValueError):  # no observed site with a mean: no error to report
            errors.append(reconstruction_error(trace))
    return Enumerated(
        torch.stack(priors),
        torch.stack(likelihoods),
        torch.stack(errors) if errors else None,
        {name: torch.stack(found) for name, found in indices.items()},
        tuple(observed),
        dims,
    )
