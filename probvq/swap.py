"""Replace the prior of named code sites in a program: the two-stage prior as an effect handler.

A second-stage prior (e.g. a PixelCNN fitted to a trained model's codes) is not part of the model
that was trained; :class:`PriorSwap` installs it without touching the model's code, the way
``poutine.condition`` fixes values: every ``"code"`` message naming a site in ``priors`` goes on
with that prior instead of the model's, in the model (the rate, ancestral sampling) and in the
guide (families that read the prior)::

    with PriorSwap({"z": pixelcnn}):
        ...  # the program's code("z", ...) now declares p(z) = pixelcnn

:class:`WithPriors` applies it to a model's programs and otherwise stands for the model, so
evaluation, importance sampling and sampling take it like any model. The handler must sit inside
the guide family's (wrap the model first, then the family), which is what ``family.wrap(WithPriors
(vae, ...).model)`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from probvq.priors import AutoregressivePrior, EnergyPrior, Prior
from probvq.sites import CodeRequest, CodeSite

ContextualPrior = Callable[[dict[str, Tensor]], Prior]
"""A prior that depends on what the program read from earlier code sites (values by name), e.g. a
PixelCNN over a lower layer conditioned on the upsampled codes of the layer above."""


class PriorSwap(Messenger):
    """Answer ``"code"`` messages for the sites named in ``priors`` with those priors.

    A prior may be a :data:`ContextualPrior`: it is called with the values of the code messages
    seen so far in this run of the program (by site or group name) and returns the prior.
    """

    def __init__(self, priors: Mapping[str, Prior | ContextualPrior]) -> None:
        super().__init__()
        self.priors = dict(priors)
        self.values: dict[str, Tensor] = {}

    def __enter__(self) -> PriorSwap:
        self.values = {}  # one run of a program: contexts come from its own codes
        return super().__enter__()

    def _resolve(self, name: str, prior: Prior) -> Prior:
        swapped = self.priors.get(name, prior)
        if isinstance(swapped, Tensor | AutoregressivePrior | EnergyPrior):
            return swapped
        return swapped(self.values)

    def _pyro_code(self, msg: dict) -> None:
        request: CodeRequest = msg["args"][0]
        if not any(site.name in self.priors for site in request.sites):
            return
        priors = tuple(
            self._resolve(site.name, prior)
            for site, prior in zip(request.sites, request.priors, strict=True)
        )
        for site, prior in zip(request.sites, priors, strict=True):
            site.check_prior(prior)
        msg["args"] = (replace(request, priors=priors), *msg["args"][1:])

    def _pyro_post_code(self, msg: dict) -> None:
        self.values[msg["args"][0].name] = msg["value"]


class WithPriors(nn.Module):
    """``vae`` with the priors of some sites replaced (see the module); the prior modules it holds
    move and switch modes with it.

    Args:
        vae: the model. priors: prior by site name; each must be a site of ``vae``.
    """

    def __init__(self, vae: nn.Module, priors: Mapping[str, Prior | ContextualPrior]) -> None:
        super().__init__()
        names = {site.name for site in vae.code_sites}
        unknown = sorted(set(priors) - names)
        if unknown:
            raise ValueError(f"priors: {unknown} are not code sites of the model ({sorted(names)})")
        self.vae = vae
        self.swapped = nn.ModuleDict({k: v for k, v in priors.items() if isinstance(v, nn.Module)})
        self.swap = PriorSwap(priors)

    @property
    def code_sites(self) -> list[CodeSite]:
        return list(self.vae.code_sites)

    @property
    def likelihood(self):
        return self.vae.likelihood

    def check_data(self, x: Tensor, name: str = "x") -> None:
        check = getattr(self.vae, "check_data", None)
        if check is not None:
            check(x, name)

    def data_encoders(self) -> tuple[nn.Module, ...]:
        return tuple(getattr(self.vae, "data_encoders", tuple)())

    def model(self, *args, **kwargs) -> None:
        with self.swap:
            self.vae.model(*args, **kwargs)

    def guide(self, *args, **kwargs) -> None:
        with self.swap:
            self.vae.guide(*args, **kwargs)
