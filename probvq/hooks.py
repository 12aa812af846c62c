"""Between-step hooks: model state that changes outside gradient descent.

Some state is not learned by the optimiser: EMA codebooks and dead-code restarts (committed by the
guide families), temperature schedules, persistent Gibbs chains of an energy prior. Any module of a
model or a family may take part by defining either method:

* ``before_run(total_steps)``: called once before training, with the run's length (schedules given
  relative to the run read it);
* ``after_step()``: called after every optimiser step;
* ``discard_step()``: called instead of ``after_step`` when the engine skips a step (a non-finite
  loss or gradient): statistics observed during the step must be forgotten, not committed;
* ``before_evaluation(seed)``: called before every evaluation pass to compute what evaluation
  needs from the current parameters but training does not (an energy prior's ``log Z``, by
  enumeration or annealed importance sampling, seeded by ``seed``); returns a JSON-ready report,
  or ``None``. :func:`probvq.inference.evaluate` and ``diagnose`` call it.

:func:`after_step` and :func:`before_run` call them on every distinct submodule of the given roots
that defines them, each once, in ``modules()`` order. :func:`probvq.inference.fit` calls both; a
hand-written loop (e.g. Pyro's ``SVI``) calls them itself::

    probvq.before_run(steps, vae, family)
    for step in range(steps):
        svi.step(x)
        probvq.after_step(vae, family)
"""

from __future__ import annotations

from torch import nn


def _with(method: str, roots: tuple[nn.Module, ...]) -> list[nn.Module]:
    seen: set[int] = set()
    found = []
    for root in roots:
        for module in root.modules():
            if id(module) not in seen and callable(getattr(module, method, None)):
                seen.add(id(module))
                found.append(module)
    return found


def before_run(total_steps: int, *roots: nn.Module) -> None:
    """Tell every module under ``roots`` that defines ``before_run`` how long the run is."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: expected a positive integer, got {total_steps!r}")
    for module in _with("before_run", roots):
        module.before_run(total_steps)


def after_step(*roots: nn.Module) -> None:
    """Run the ``after_step`` hook of every module under ``roots`` that defines one."""
    for module in _with("after_step", roots):
        module.after_step()


def discard_step(*roots: nn.Module) -> None:
    """Run the ``discard_step`` hook of every module under ``roots`` that defines one."""
    for module in _with("discard_step", roots):
        module.discard_step()


def before_evaluation(seed: int, *roots: nn.Module) -> dict[str, dict]:
    """Run every ``before_evaluation`` hook under ``roots``; their reports by module name (hooks
    that return ``None`` report nothing)."""
    names = {id(m): name for root in roots for name, m in root.named_modules()}
    reports = {names[id(m)] or type(m).__name__: m.before_evaluation(seed)
               for m in _with("before_evaluation", roots)}  # fmt: skip
    return {name: report for name, report in reports.items() if report is not None}
