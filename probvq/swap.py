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

from collections.abc import Mapping
from dataclasses import replace

from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from probvq.priors import Prior
from probvq.sites import CodeRequest, CodeSite


class PriorSwap(Messenger):
    """Answer ``"code"`` messages for the sites named in ``priors`` with those priors."""

    def __init__(self, priors: Mapping[str, Prior]) -> None:
        super().__init__()
        self.priors = dict(priors)

    def _pyro_code(self, msg: dict) -> None:
        request: CodeRequest = msg["args"][0]
        if not any(site.name in self.priors for site in request.sites):
            return
        priors = tuple(
            self.priors.get(site.name, prior)
            for site, prior in zip(request.sites, request.priors, strict=True)
        )
        for site, prior in zip(request.sites, priors, strict=True):
            site.check_prior(prior)
        msg["args"] = (replace(request, priors=priors), *msg["args"][1:])


class WithPriors(nn.Module):
    """``vae`` with the priors of some sites replaced (see the module); the prior modules it holds
    move and switch modes with it.

    Args:
        vae: the model. priors: prior by site name; each must be a site of ``vae``.
    """

    def __init__(self, vae: nn.Module, priors: Mapping[str, Prior]) -> None:
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
