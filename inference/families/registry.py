"""The family registry: a family is one file plus one :func:`register_family` decoration.

A registration gives the face (CLI, config files, ``build``) everything it needs to offer a family
without naming it anywhere else: its name and one-line summary, its settings (default, type, help
text), which become ``--flags`` of ``probvq train`` and the keys of the family's section of a config
file (``[sq]`` in TOML), and what ``codebook_init = "auto"`` means under it. Settings must be keyword
arguments of the family's constructor, whose defaults they take, so the two cannot drift apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from probvq.sites import CodeSite

from .base import GuideFamily

SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Setting:
    """One setting of a family: help text, type (from the default if not given), and the default,
    which registration reads from the family's constructor."""

    help: str
    kind: type | None = None
    default: Any = None

    @property
    def type(self) -> type:
        kind = self.kind or type(self.default)
        if kind not in SCALARS:
            raise TypeError(f"a setting holds one of {[t.__name__ for t in SCALARS]}, got {kind}")
        return kind

    def check(self, name: str, value: Any) -> Any:
        """``value`` as this setting's type, or a ``ValueError`` naming the setting."""
        if value is None and self.default is None:
            return None
        kind = self.type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}")
        return value


@dataclass(frozen=True)
class FamilySpec:
    """A registered family."""

    name: str
    cls: type[GuideFamily]
    summary: str
    settings: Mapping[str, Setting] = field(default_factory=dict)
    codebook_init: str = "kmeans"

    def resolve(self, values: Mapping[str, Any], source: str = "family settings") -> dict[str, Any]:
        """Every setting, from ``values`` where given and the defaults elsewhere; checks types."""
        unknown = sorted(set(values) - set(self.settings))
        if unknown:
            raise ValueError(
                f"{source}: {unknown} are not settings of family {self.name!r} "
                f"(its settings: {sorted(self.settings)})"
            )
        return {
            name: setting.check(name, values.get(name, setting.default))
            for name, setting in self.settings.items()
        }

    def build(self, sites: Sequence[CodeSite], values: Mapping[str, Any] | None = None) -> GuideFamily:
        """The family for ``sites`` with ``values`` (defaults for the rest)."""
        return self.cls(sites, **self.resolve(values or {}))


FAMILIES: dict[str, FamilySpec] = {}
"""Every registered family by name, in registration order."""


def _constructor_defaults(cls: type) -> dict[str, Any]:
    """Keyword defaults of ``cls``'s constructor, following ``**kwargs`` up the base classes."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        for p in parameters:
            if p.default is not inspect.Parameter.empty:
                found.setdefault(p.name, p.default)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return found


def register_family(
    name: str, summary: str, codebook_init: str = "kmeans", **settings: Setting
) -> Callable[[type[GuideFamily]], type[GuideFamily]]:
    """Class decorator: register a :class:`GuideFamily` under ``name`` with its ``settings``."""

    def decorate(cls: type[GuideFamily]) -> type[GuideFamily]:
        if name in FAMILIES:
            raise ValueError(f"a family named {name!r} is registered already")
        defaults = _constructor_defaults(cls)
        resolved = {}
        for key, setting in settings.items():
            if key not in defaults:
                raise TypeError(
                    f"family {name!r}: setting {key!r} is not a keyword argument of {cls.__name__}"
                )
            resolved[key] = replace(setting, default=defaults[key])
            resolved[key].type  # noqa: B018 - refuses non-scalar settings at import time
        FAMILIES[name] = FamilySpec(name, cls, summary, resolved, codebook_init)
        return cls

    return decorate
