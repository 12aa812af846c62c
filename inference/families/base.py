"""Guide families: effect handlers that decide how each code site is inferred.

A model and its guide declare code sites with :func:`probvq.code`; neither says how the site is
inferred. A :class:`GuideFamily` does, in the manner of Pyro's ``config_enumerate``: wrap both
programs (``family.wrap(vae.model)``, ``family.wrap(vae.guide)``) and every ``"code"`` message the
family claims is answered by :meth:`GuideFamily.model_codes` or :meth:`GuideFamily.guide_codes`,
which issue the actual ``pyro.sample`` statements. Swapping the family swaps the inference; the model
code never changes. Families nest: one that claims only some sites leaves the rest to an outer one.

A message may carry a :class:`~probvq.CodeGroup` of residual depths: the guide quantises
``r_1 = zhat``, then ``r_{l+1} = r_l - v_l`` with ``v_l`` the value drawn at depth l, and both
programs read ``sum_l v_l``. A lone site is a group of one.

A family is also an ``nn.Module``: per-site parameters (e.g. SQ's variance) train with the networks
and travel in its ``state_dict``. Wrapped programs register the parameters of the program's module
and of the family with Pyro's parameter store on every run, so a plain ``pyro.infer.SVI`` loop
optimises them. Two switches govern a family:

* ``family.train()`` / ``family.eval()``: in training mode it initialises codebooks from data, records
  assignments, and commits codebook updates in :meth:`GuideFamily.after_step`;
* ``with family.exact():`` guides draw exact hard codes from q (no relaxation, no straight-through),
  the sampling that exact ELBO diagnostics need.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from probvq.codebook import Codebook
from probvq.params import register
from probvq.priors import Prior
from probvq.sites import CodeRequest, CodeSite
from probvq.spaces import CodeSpace

from ..objectives.elbo import CodeELBO


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
        if self.family.handles(request):
            msg["value"] = self.family.answer(request)
            msg["done"] = True
            msg["stop"] = True


def _registering(
    program: Callable, handled: Callable, families: Sequence[nn.Module], pyro_params: bool
) -> Callable:
    """``handled`` (``program`` under the families' handlers), registering parameters each run.

    The program's own module (for a bound method of an ``nn.Module``) and the families are
    registered; code spaces of the families' sites too, where that module does not own them.
    Without ``pyro_params`` nothing is registered: probvq's own loops optimise the modules'
    parameters directly, and Pyro's store marks registered tensors with a weak reference that
    keeps a module from being pickled.
    """
    if not pyro_params:
        return handled
    owner = getattr(program, "__self__", None)
    modules = [owner] if isinstance(owner, nn.Module) else []
    owned = {id(m) for m in owner.modules()} if isinstance(owner, nn.Module) else set()
    for family in families:
        modules.append(family)
        for site in family.sites.values():
            if id(site.space) not in owned:
                owned.add(id(site.space))
                modules.append(site.space)

    @functools.wraps(program)
    def run(*args, **kwargs):
        for module in modules:
            register(module)
        return handled(*args, **kwargs)

    return run


class GuideFamily(nn.Module):
    """Base class. Subclasses implement :meth:`draw` and may extend the model and guide sides.

    Args:
        sites: the code sites of the model (``vae.code_sites``).
        claims: names of the sites this family answers; all of ``sites`` by default.
    """

    name = "base"
    elbo_class: type[ELBO] = CodeELBO
    """The Pyro ELBO that trains this family."""
    space_type: type[CodeSpace] = Codebook
    """The kind of code space this family infers."""
    answers_groups: bool = True
    """Whether it can quantise a residual code group (a feature read in value space, depth by depth)."""

    def __init__(self, sites: Sequence[CodeSite], claims: Iterable[str] | None = None) -> None:
        super().__init__()
        known = {site.name: site for site in sites}
        names = set(known) if claims is None else set(claims)
        missing = sorted(names - set(known))
        if missing:
            raise ValueError(f"claims: no code sites named {missing} among {sorted(known)}")
        # A plain dict: the sites belong to the model, which saves and moves them.
        self.sites: dict[str, CodeSite] = {name: known[name] for name in sorted(names)}
        for site in self.sites.values():
            self.check_site(site)
        self._exact = False

    # -- what this family accepts ----------------------------------------------------------

    def check_site(self, site: CodeSite) -> None:
        """Refuse sites this family cannot infer (those whose space is not a :attr:`space_type`)."""
        if not isinstance(site.space, self.space_type):
            raise ValueError(
                f"sites: the {self.name!r} family infers {self.space_type.__name__} sites; site "
                f"{site.name!r} has a {type(site.space).__name__} space"
            )

    def check_prior(self, site: CodeSite, prior: Prior) -> None:
        """Refuse a kind of prior this family cannot pay a correct rate against (default: none)."""

    def feature_shape(self, site: CodeSite) -> tuple[int, ...]:
        """The trailing shape of the features this family reads (default: the site's values)."""
        return tuple(site.value_shape)

    def check_features(self, site: CodeSite, features: Tensor) -> None:
        """Refuse features that do not end in :meth:`feature_shape` after some batch dimensions."""
        tail = self.feature_shape(site)
        if tuple(features.shape[-len(tail) :]) != tail or features.dim() <= len(tail):
            raise ValueError(
                f"features: the {self.name!r} family expects features (*batch, "
                f"{', '.join(map(str, tail))}) for site {site.name!r}, got {tuple(features.shape)}"
            )

    def handles(self, request: CodeRequest) -> bool:
        """Whether this family answers ``request`` (it claims every site of it, or none)."""
        mine = [self.sites.get(site.name) is site for site in request.sites]
        if all(mine):
            return True
        for site, claimed in zip(request.sites, mine, strict=True):
            if site.name in self.sites and not claimed:
                raise ValueError(
                    f"site {site.name!r}: this {self.name!r} family was built for another model's "
                    "site of that name; build the family from this model's sites"
                )
        if any(mine):
            raise ValueError(
                f"group {request.name!r}: the {self.name!r} family claims only some of its sites; "
                "a family answers a code group whole"
            )
        return False

    # -- switches --------------------------------------------------------------------------

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

    def wrap(self, program: Callable, pyro_params: bool = True) -> Callable:
        """``program`` with this family answering its code sites (a program transformer).

        With ``pyro_params`` every run registers the parameters of the program's module and of the
        family with Pyro's parameter store, so ``pyro.infer.SVI`` optimises them.
        """
        return _registering(program, FamilyMessenger(self)(program), [self], pyro_params)

    def elbo(self, **kwargs) -> ELBO:
        return self.elbo_class(**kwargs)

    # -- answering code sites --------------------------------------------------------------

    def answer(self, request: CodeRequest) -> Tensor:
        if len(request.sites) > 1 and not self.answers_groups:
            raise ValueError(
                f"group {request.name!r}: the {self.name!r} family does not quantise residual code "
                "groups; give the group a codebook family such as vq, sq or rr"
            )
        for site, prior in request.members:
            self.check_prior(site, prior)
        if not request.in_guide:
            return request.value(self.model_codes(request))
        self.check_features(request.sites[0], request.features)
        if request.features.dtype in (torch.float16, torch.bfloat16):
            # Distances, softmaxes over codes and KLs stay in float32 under autocast.
            request = replace(request, features=request.features.float())
        return request.value(self.guide_codes(request))

    def model_codes(self, request: CodeRequest) -> list[Tensor]:
        """The generative side: ``z_l ~ p(z_l)`` at every depth."""
        return request.prior_codes()

    def guide_codes(self, request: CodeRequest) -> list[Tensor]:
        """The inference side: quantise the residual of ``request.features`` depth by depth."""
        residual = request.features
        codes = []
        for depth, site in enumerate(request.sites):
            learning = self._learning(site)
            if learning and not bool(site.space.initialised):
                site.space.initialise(residual)
            code = self.draw(request, depth, residual)
            if learning and self._keeps_statistics(site.space):
                site.space.observe(residual, site.space.index_of(code))
            codes.append(code)
            if depth + 1 < len(request.sites):
                residual = residual - site.space.value_of(code)
        return codes

    def draw(self, request: CodeRequest, depth: int, residual: Tensor) -> Tensor:
        """Sample depth ``depth`` of ``request`` from q given the ``residual`` it quantises."""
        raise NotImplementedError

    def _learning(self, site: CodeSite) -> bool:
        return self.training and torch.is_grad_enabled() and isinstance(site.space, Codebook)

    def _keeps_statistics(self, space: Codebook) -> bool:
        return self.ema_decay is not None or space.restart_threshold > 0

    # -- between steps ---------------------------------------------------------------------

    @property
    def ema_decay(self) -> float | None:
        """Decay of EMA codebook updates, or ``None`` when codebooks learn by gradient."""
        return None

    def after_step(self) -> None:
        """Called after each optimiser step: commit the codebook statistics of the step."""
        for space in {id(s.space): s.space for s in self.sites.values()}.values():
            if isinstance(space, Codebook):
                space.commit(self.ema_decay)


class FamilyStack(nn.Module):
    """Families that claim disjoint sites of one model, used as a single family.

    ``FamilyStack(SQ(sites, claims=["top"]), RR(sites, claims=["bottom"]))`` wraps programs with
    all their handlers and switches all of them to exact codes together; their between-step hooks
    run through :func:`probvq.after_step` like any module's.
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

    def wrap(self, program: Callable, pyro_params: bool = True) -> Callable:
        handled = program
        for family in self.families:
            handled = FamilyMessenger(family)(handled)
        return _registering(program, handled, list(self.families), pyro_params)

    def elbo(self, **kwargs) -> ELBO:
        return self.elbo_class(**kwargs)
