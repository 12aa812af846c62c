"""Sites that are not codes but matter to the objective, and the ``infer`` flags that say how.

Pyro records every ``pyro.sample`` statement; what an ELBO makes of one depends on its role, which
these flags declare:

* :data:`REGULARISER`: a training-only penalty in the guide (VQ's codebook and commitment terms),
  added to the loss and kept out of every bound (:func:`regulariser`);
* :data:`RATE_OF`: a model factor that completes a latent's prior (an energy, a ``log Z``
  surrogate), reported as that latent's rate rather than as distortion (:func:`prior_factor`);
* :data:`INTEGRATES_OUT`: a latent that no other site reads, in model and guide alike (SQ's
  dequantisation variable). Its densities integrate to one given everything else, so importance
  weights may leave it out: the weight without it is the weight with it averaged over its draw (a
  Rao-Blackwellisation), with the same expectation and less variance. It still counts in the ELBO.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from torch import Tensor

REGULARISER = "probvq_regulariser"
RATE_OF = "probvq_rate_of"
INTEGRATES_OUT = "probvq_integrates_out"


def regulariser(name: str, penalty: Tensor) -> None:
    """Add a training-only ``penalty`` (per data point) to the loss, outside the ELBO.

    It is a guide factor: a guide's log-factor counts as ``log q``, so it enters the loss with a
    plus sign.
    """
    unit = dist.Unit(penalty, has_rsample=True)
    infer = {"is_auxiliary": True, REGULARISER: True}
    pyro.sample(name, unit, obs=unit.sample(), infer=infer)


def prior_factor(latent: str, name: str, log_factor: Tensor) -> None:
    """Add ``log_factor`` to the model's log-density as part of latent ``latent``'s prior.

    Like ``pyro.factor``, but ELBO diagnostics report it in ``latent``'s rate, not as distortion.
    """
    unit = dist.Unit(log_factor, has_rsample=True)
    pyro.sample(name, unit, obs=unit.sample(), infer={RATE_OF: latent})
