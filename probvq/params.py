"""Pyro's parameter store and ``nn.Module`` s: how a probvq program's parameters reach Pyro.

``pyro.infer.SVI`` optimises the parameters its loss touched through ``pyro.param`` sites, keyed by
name in the global parameter store. A module's parameters get there through :func:`register`, which
a family's wrapped programs call on every run (so each step's parameter sites are seen).
``pyro.module`` does the same under a name the user picks, but if that name already holds another
module's tensors it silently hands back the old ones; :func:`register` names each module by its
identity and replaces entries that are not this module's own tensors.
"""

from __future__ import annotations

import pyro
from torch import nn


def store_name(module: nn.Module) -> str:
    """The parameter-store prefix of ``module``: its class and identity."""
    return f"{type(module).__name__}@{id(module):x}"


def register(module: nn.Module) -> None:
    """Emit a ``pyro.param`` site for every trainable parameter of ``module`` (its own tensors)."""
    store = pyro.get_param_store()
    prefix = store_name(module)
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        full = f"{prefix}$$${name}"
        if full in store and store[full] is not parameter:
            del store[full]  # a collected module's entry whose id was reused
        pyro.param(full, parameter)
