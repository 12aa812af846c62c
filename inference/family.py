"""Guide families: effect handlers that decide how each code site is inferred.

A model and its guide declare code sites with :func:`probvq.code`; neither says how the site is
inferred. A :class:`GuideFamily` does, in the manner of Pyro's ``config_enumerate``: wrap both
programs (``family.wrap(vae.model)``, ``family.wrap(vae.guide)``) and every ``"code"`` message the
family claims is answered by :meth:`GuideFamily.model_site` or :meth:`GuideFamily.guide_site`, which
issue the actual ``pyro.sample`` statements. Swapping the family swaps the inference; the model code
never changes. Families nest: one that claims only some sites leaves the rest to an outer one.

A family is also an ``nn.Module``: per-site parameters (e.g. SQ's variance) train with the networks
and travel in its ``state_dict``. Two switches govern it:

* ``family.train()`` / ``family.eval()``: in training mode it initialises codebooks from data, records
  assignments, and commits codebook updates in :meth:`after_step`;
* ``with family.exact():`` guides draw exact hard codes from q (no relaxation, no straight-through),
  the sampling that exact ELBO diagnostics need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from probvq.codebook import Codebook
from probvq.sites import CodeRequest, CodeSite

REGULARISER = "probvq_regulariser"
"""``infer`` flag of training-only penalty sites; ELBO diagnostics report them apart."""

INTEGRATES_OUT = "probvq_integrates_out"
"""``infer`` flag of a latent site that no other site reads, in model and guide alike.

Its densities integrate to one given everything else, so importance weights may leave it out: the
weight without it is the weight with it averaged over its draw (a Rao-Blackwellisation), which
has the same expectation and less variance. It still counts in the ELBO, where it is a term of the
objective.
"""


def regulariser(name: str, penalty: Tensor) -> None:
    """Add a training-only ``penalty`` (per data point) to the loss, outside the ELBO.

    It is a guide factor: a guide's log-factor counts as ``log q``, so it enters the loss with a
    plus sign.
    """
    unit = dist.Unit(penalty, has_rsample=True)
    infer = {"is_auxiliary": True, REGULARISER: True}
    pyro.sample(name, unit, obs=unit.sample(), infer=infer)


def squared_error(a: Tensor, b: Tensor, event_dims: int) -> Tensor:
    """``||a - b||^2`` summed over the last ``event_dims`` (>= 1) dimensions."""
    return (a - b).pow(2).sum(tuple(range(-event_dims, 0)))


class FamilyMessenger(Messenger):
    """Routes ``"code"`` messages to a family."""

    def __init__(self, family: GuideFamily) -> None:
        super().__init__()
        self.family = family

    def _pyro_code(self, msg: dict) -> None:
        request: CodeRequest = msg["args"][0]
        if not self.family.handles(request.site):
            if request.site.name in self.family.sites:
                raise ValueError(
                    f"site {request.site.name!r}: this {self.family.name!r} family was built for "
                    "another model's site of that name; build the family from this model's sites"
                )
            return
        msg["value"] = self.family.answer(request)
        msg["done"] = True
        msg["stop"] = True


class GuideFamily(nn.Module):
    """Base class. Subclasses implement :meth:`guide_site` and may override :meth:`model_site`.

    Args:
        sites: the code sites of the model (``vae.code_sites``).
        claims: names of the sites this family answers; all of ``sites`` by default.
    """

    name = "base"
    elbo_class: type[ELBO] = TraceMeanField_ELBO
    """The Pyro ELBO that trains this family (analytic KL where registered)."""

    def __init__(self, sites: Sequence[CodeSite], claims: Iterable[str] | None = None) -> None:
        super().__init__()
        known = {site.name: site for site in sites}
        names = set(known) if claims is None else set(claims)
        missing = sorted(names - set(known))
        if missing:
            raise ValueError(f"claims: no code sites named {missing} among {sorted(known)}")
        self.sites = {name: known[name] for name in sorted(names)}
        for site in self.sites.values():
            self.check_site(site)
        self._exact = False

    def check_site(self, site: CodeSite) -> None:
        """Refuse sites this family cannot infer (default: codebook sites only)."""
        if not isinstance(site.space, Codebook):
            raise ValueError(
                f"sites: the {self.name!r} family quantises against a codebook; site "
                f"{site.name!r} has a {type(site.space).__name__} space"
            )

    def handles(self, site: CodeSite) -> bool:
        return self.sites.get(site.name) is site

    @property
    def is_exact(self) -> bool:
        return self._exact

    @contextmanager
    def exact(self) -> Iterator[None]:
        """Within this block, guides draw exact hard codes from q."""
        previous, self._exact = self._exact, True
        try:
            yield
        finally:
            self._exact = previous

    def wrap(self, program: Callable) -> Callable:
        """``program`` with this family answering its code sites (a program transformer)."""
        return FamilyMessenger(self)(program)

    def elbo(self, **kwargs) -> ELBO:
        return self.elbo_class(**kwargs)

    # -- answering code sites --------------------------------------------------------------

    def answer(self, request: CodeRequest) -> Tensor:
        if not request.in_guide:
            return self.model_site(request)
        space = request.site.space
        learning = self.training and torch.is_grad_enabled()
        if learning and isinstance(space, Codebook) and not bool(space.initialised):
            space.initialise(request.features)
        value = self.guide_site(request)
        if learning and isinstance(space, Codebook) and self._keeps_statistics(space):
            space.observe(request.features, space.index_of(value))
        return value

    def _keeps_statistics(self, space: Codebook) -> bool:
        return self.ema_decay is not None or space.restart_threshold > 0

    def model_site(self, request: CodeRequest) -> Tensor:
        """The generative side: ``z ~ p(z)``."""
        return pyro.sample(request.site.name, request.site.prior(request.prior))

    def guide_site(self, request: CodeRequest) -> Tensor:
        """The inference side: ``z ~ q(z | x)`` from ``request.features``."""
        raise NotImplementedError

    # -- between steps ---------------------------------------------------------------------

    @property
    def ema_decay(self) -> float | None:
        """Decay of EMA codebook updates, or ``None`` when codebooks learn by gradient."""
        return None

    def after_step(self) -> None:
        """Called after each optimiser step: commit the codebook statistics of the step."""
        for site in self.sites.values():
            if isinstance(site.space, Codebook):
                site.space.commit(self.ema_decay)


class FamilyStack(nn.Module):
    """Families that claim disjoint sites of one model, used as a single family.

    ``FamilyStack(SQ(sites, claims=["top"]), RR(sites, claims=["bottom"]))`` wraps programs with
    both handlers, switches all of them to exact codes together, and steps all their schedules.
    """

    def __init__(self, *families: GuideFamily) -> None:
        super().__init__()
        if not families:
            raise ValueError("families: a stack needs at least one family")
        claimed: set[str] = set()
        for family in families:
            overlap = claimed & set(family.sites)
            if overlap:
                raise ValueError(f"families: sites {sorted(overlap)} are claimed twice")
            claimed |= set(family.sites)
        elbos = {family.elbo_class for family in families}
        if len(elbos) > 1:
            raise ValueError(
                f"families: they train with different ELBOs {sorted(e.__name__ for e in elbos)}"
            )
        self.families = nn.ModuleList(families)
        self.name = "+".join(family.name for family in families)
        self.elbo_class = families[0].elbo_class
        self.sites = {name: site for family in families for name, site in family.sites.items()}

    @contextmanager
    def exact(self) -> Iterator[None]:
        with ExitStack() as stack:
            for family in self.families:
                stack.enter_context(family.exact())
            yield

    def wrap(self, program: Callable) -> Callable:
        for family in self.families:
            program = family.wrap(program)
        return program

    def elbo(self, **kwargs) -> ELBO:
        return self.elbo_class(**kwargs)

    def after_step(self) -> None:
        for family in self.families:
            family.after_step()
