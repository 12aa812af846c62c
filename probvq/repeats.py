"""Data encoders run once per data point while a batch holds each point's rows ``k`` times.

Importance sampling draws ``k`` codes for every point as ``k`` rows of one batch,
``x.repeat_interleave(k, 0)``. A guide first maps the data to features, ``zhat = f(x)``, then draws
codes from them. When ``f`` is a deterministic per-row function of the data (row ``i`` of its output
depends on row ``i`` of its input alone: a conv encoder in eval mode, no dropout, no batch
statistics), the ``k`` copies of a point get the same features. With ``r = x.repeat_interleave(k, 0)``,
so that ``r[::k] = x``::

    f(r) = f(x).repeat_interleave(k, 0) = f(r[::k]).repeat_interleave(k, 0)

so the encoder need only see every ``k``-th row, and its output can be repeated ``k`` times. The
guide and model still run on all ``points x k`` rows (each draw gets its own code, dequantisation
noise and decoder pass), but the encoder's cost, its share of the pass, scales with the points, not
the rows. A VQ-VAE's conv encoder costs nearly as much as its decoder: running it once per point
takes 40 to 55 % off the time of ``k = 1000`` draws (``benchmarks/iwae.py``).

A model declares such modules with ``data_encoders()`` (see :class:`probvq.sites.DiscreteVAE`);
:func:`data_encoders` reads the declaration, and :func:`once_per_point` applies it for the duration
of a block, with forward hooks that are removed when the block ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from pyro.infer.util import is_validation_enabled
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map


def data_encoders(vae: object) -> tuple[nn.Module, ...]:
    """The modules ``vae`` declares with ``data_encoders()``; none when it declares nothing.

    A module inside another declared one is left out: the outer one already sees each point once.
    """
    declare = getattr(vae, "data_encoders", None)
    if declare is None:
        return ()
    modules = list(declare())
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"data_encoders: expected nn.Modules, got {type(module).__name__}")
    inner = {id(sub) for module in modules for sub in module.modules() if sub is not module}
    distinct = {id(module): module for module in modules if id(module) not in inner}
    return tuple(distinct.values())


def _every_kth_row(k: int, validate: bool) -> Callable:
    """A forward pre-hook: check that each tensor argument holds k copies of its rows, keep one."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for value in tree_leaves((args, kwargs)):
            if not isinstance(value, Tensor):
                continue
            if value.dim() == 0 or value.shape[0] % k:
                raise ValueError(
                    f"data encoder {type(module).__name__}: expected each point's rows repeated "
                    f"{k} times, got an input of shape {tuple(value.shape)}"
                )
            copies = value.unflatten(0, (-1, k))
            if validate and not torch.equal(copies[:, 1:], copies[:, :-1]):
                raise ValueError(
                    f"data encoder {type(module).__name__}: the rows of its input are not "
                    f"{k} consecutive copies of each point (x.repeat_interleave({k}, 0))"
                )
        return tree_map(lambda v: v[::k] if isinstance(v, Tensor) else v, (args, kwargs))

    return hook


def _repeat_rows(k: int) -> Callable:
    """A forward hook: repeat each row of each output tensor k times."""

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        return tree_map(lambda v: v.repeat_interleave(k, 0) if isinstance(v, Tensor) else v, output)

    return hook


@contextmanager
def once_per_point(
    encoders: Sequence[nn.Module], k: int, validate: bool | None = None
) -> Iterator[None]:
    """Within the block, each of ``encoders`` computes its forward on every ``k``-th row only.

    Every tensor argument of a call must hold ``k`` consecutive copies of each row
    (``x.repeat_interleave(k, 0)``); the module runs on ``x[::k]`` and its tensor outputs are
    repeated ``k`` times along the first dimension, so callers see the shapes and values they would
    without the block. A first dimension that ``k`` does not divide is refused; with ``validate``
    (default: Pyro's validation flag) the copies are also compared, which costs one read of the input.
    The modules must be in eval mode, where the declaration holds (dropout is not per-point).
    Their hooks are removed on leaving the block, on an error too.
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k: expected a positive number of copies per point, got {k!r}")
    for module in encoders:
        if not isinstance(module, nn.Module):
            raise TypeError(f"encoders: expected nn.Modules, got {type(module).__name__}")
        if any(sub.training for sub in module.modules()):
            raise ValueError(
                f"encoders: {type(module).__name__} is in training mode; a data encoder runs once "
                "per point in eval mode only"
            )
    if validate is None:
        validate = is_validation_enabled()
    with ExitStack() as hooks:
        if k > 1:
            take, repeat = _every_kth_row(k, validate), _repeat_rows(k)
            for module in encoders:
                # Slicing runs after the module's other pre-hooks and repeating before its other
                # forward hooks, so those see the whole input and the whole output.
                hooks.callback(module.register_forward_pre_hook(take, with_kwargs=True).remove)
                hooks.callback(module.register_forward_hook(repeat, prepend=True).remove)
        yield
