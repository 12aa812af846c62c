"""Ancestral sampling from a model's own prior, and partial resampling of an image's codes.

Without a guide family, a model's ``code`` sites draw exact codes from their priors (see
:func:`probvq.code`), so running the model program *is* ancestral sampling: for a hierarchy,
``z_L ~ p(z_L)``, then ``z_{L-1} ~ p(z_{L-1} | z_L)``, ..., and the likelihood's mean given all of
them. No second-stage prior is involved; what comes out is what the trained model believes.

:func:`ancestral_trace` can also *keep* some layers: the exact guide (``family.exact()``) infers
the codes of one image, the named sites are conditioned on them (``poutine.condition``) and every
other site is redrawn from its prior given them. Keeping the layers above ``l`` and redrawing the
rest shows what the lower layers control.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pyro import poutine
from pyro.poutine import Trace
from torch import Tensor

from probvq.sites import DiscreteVAE

from .objectives.evaluate import check_inputs, evaluation
from .objectives.terms import observed_means

if TYPE_CHECKING:
    from .families import FamilyStack, GuideFamily


def ancestral_trace(
    vae: DiscreteVAE,
    family: GuideFamily | FamilyStack,
    n: int,
    image_shape: Sequence[int],
    seed: int = 0,
    keep: Sequence[str] = (),
    image: Tensor | None = None,
) -> Trace:
    """The model's trace for ``n`` draws of ``z`` top-down from the prior (see the module).

    With ``keep`` (site names) and ``image`` (one prepared example, shaped ``image_shape``), the
    kept sites hold the codes the exact guide draws for ``image`` (one draw, shared by all ``n``
    samples) and the others are redrawn from their priors given them.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of samples, got {n!r}")
    names = [site.name for site in vae.code_sites]
    unknown = sorted(set(keep) - set(names))
    if unknown:
        raise ValueError(f"keep: no code sites named {unknown} among {names}")
    if keep and image is None:
        raise ValueError("image: keeping codes needs the image whose codes are kept")
    with evaluation(vae, family, seed) as device:
        codes = {}
        if keep:
            x = image.unsqueeze(0).to(device)
            check_inputs(vae, x, "image")
            guide = family.wrap(vae.guide, pyro_params=False)
            with family.exact():
                inferred = poutine.trace(guide).get_trace(x)
            for name in keep:
                value = inferred.nodes[name]["value"]
                codes[name] = value.expand(n, *value.shape[1:])
        # The observed site's value is not read: its likelihood's mean is what is shown.
        placeholder = torch.zeros(n, *image_shape, device=device)
        return poutine.trace(poutine.condition(vae.model, data=codes)).get_trace(placeholder)


def likelihood_mean(trace: Trace) -> Tensor:
    """The mean of the first observed site's likelihood in a model trace, on the CPU."""
    found = observed_means(trace)
    if not found:
        raise ValueError("the model has no observed site with a mean to show")
    return found[0][2].detach().cpu()
