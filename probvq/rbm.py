"""Restricted Boltzmann machines over binary latents: free energy, Gibbs sampling, and log Z.

An RBM over ``h in {0, 1}^D`` (the latent units a VAE's guide infers) with ``M`` auxiliary units
``u in {0, 1}^M``, summed out::

    E(h, u) = -b.h - c.u - h^T W u
    F(h)    = -b.h - sum_j softplus(c_j + (h W)_j)          p(h) = exp(-F(h)) / Z

Both conditionals factorise, ``p(u_j = 1 | h) = sigmoid(c_j + (h W)_j)`` and
``p(h_i = 1 | u) = sigmoid(b_i + (W u)_i)``, which gives block Gibbs sampling (:meth:`RBM.gibbs`).

``log Z`` is a sum over ``2^min(D, M)`` states of the smaller side (:meth:`RBM.log_z_exact`,
for ``min(D, M) <= 20``), and otherwise estimated by annealed importance sampling (:func:`ais`,
Neal 2001; for RBMs Salakhutdinov and Murray 2008, "On the quantitative analysis of deep belief
networks"): from a factorial base ``p_0(h) = prod_i Bernoulli(h_i; sigmoid(a_i))`` through

    log f_beta(h) = (1 - beta) a.h + beta b.h + sum_j softplus(beta (c_j + (h W)_j))

(the joint energy ``(1 - beta) E_0 + beta E``, with ``u`` summed out; ``Z_0 = prod_i (1 + e^{a_i})
2^M``), one Gibbs sweep of ``f_beta`` per temperature. The importance weights are accumulated in
float64. ``E[w] = Z / Z_0``, so ``log mean w`` underestimates ``log Z`` on average (Jensen): a
log-likelihood computed with it is biased *upwards*. Run in reverse (``reverse_from``, samples of
``p``; Burda, Grosse and Salakhutdinov 2015, "Accurate and conservative estimates of MRF
log-likelihood using reverse annealing") the weights estimate ``Z_0 / Z`` and the log of their mean
over-estimates ``log Z`` on average, a conservative estimate, exactly so when the starting samples
are exact draws of ``p`` (:meth:`RBM.sample_exact`, which needs the same enumeration as an exact
``log Z``); from persistent-chain states that mix poorly between modes it is no guarantee.
:class:`RBMPrior` reports both, with where the reverse run started, and the larger of the two as
``conservative_log_z``.

:class:`RBMPrior` makes an RBM the energy prior of a code site (:class:`probvq.EnergyPrior`):
persistent chains (PCD, Tieleman 2008) give the gradient of ``log Z`` during training, and
``log Z`` itself is recomputed (exactly or by AIS) before every evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probvq.priors import EnergyPrior

EXACT_LIMIT = 20
"""The largest smaller side (in units) whose ``2^n`` states :meth:`RBM.log_z_exact` enumerates."""


def _positive(name: str, value: int) -> None:
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def binary_states(n: int, start: int = 0, stop: int | None = None, like: Tensor | None = None) -> Tensor:
    """Rows ``start .. stop - 1`` of the ``2^n`` binary states of ``n`` units (row i is i in binary,
    most significant unit first)."""
    stop = 2**n if stop is None else stop
    device = like.device if like is not None else None
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    return _states_of(torch.arange(start, stop, device=device), n).to(dtype)


def _states_of(index: Tensor, n: int) -> Tensor:
    """The binary states numbered ``index`` (any shape), as :func:`binary_states` numbers them."""
    bits = 2 ** torch.arange(n - 1, -1, -1, device=index.device)
    return (index.unsqueeze(-1) // bits) % 2


class RBM(nn.Module):
    """An RBM over ``units`` visible binary units (the latents) with ``hidden`` units summed out.

    Args:
        units: D, the units the free energy is a function of.
        hidden: M, the auxiliary units.
        init_scale: standard deviation of the initial weights (biases start at zero).
    """

    def __init__(self, units: int, hidden: int, init_scale: float = 0.01) -> None:
        super().__init__()
        _positive("units", units)
        _positive("hidden", hidden)
        if not (math.isfinite(init_scale) and init_scale >= 0):
            raise ValueError(f"init_scale: expected a non-negative number, got {init_scale!r}")
        self.weight = nn.Parameter(torch.randn(units, hidden) * init_scale)
        self.visible_bias = nn.Parameter(torch.zeros(units))
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))

    @property
    def units(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight.shape[1]

    def extra_repr(self) -> str:
        return f"units={self.units}, hidden={self.hidden}"

    def energy(self, h: Tensor, u: Tensor) -> Tensor:
        """``E(h, u)`` for ``h (..., D)`` and ``u (..., M)``."""
        return -(h @ self.visible_bias) - (u @ self.hidden_bias) - ((h @ self.weight) * u).sum(-1)

    def free_energy(self, h: Tensor) -> Tensor:
        """``F(h) = -log sum_u exp(-E(h, u))`` for ``h (..., D)``: shape ``(...)``."""
        return -(h @ self.visible_bias) - F.softplus(self.hidden_bias + h @ self.weight).sum(-1)

    def hidden_free_energy(self, u: Tensor) -> Tensor:
        """``-log sum_h exp(-E(h, u))`` for ``u (..., M)``: the free energy with ``h`` summed out."""
        return -(u @ self.hidden_bias) - F.softplus(self.visible_bias + u @ self.weight.T).sum(-1)

    @torch.no_grad()
    def gibbs(self, h: Tensor, sweeps: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``sweeps`` block Gibbs sweeps, ``u ~ p(u | h)`` then ``h ~ p(h | u)``, from ``h (..., D)``."""
        for _ in range(sweeps):
            u_probs = torch.sigmoid(self.hidden_bias + h @ self.weight)
            u = torch.bernoulli(u_probs, generator=generator)
            h_probs = torch.sigmoid(self.visible_bias + u @ self.weight.T)
            h = torch.bernoulli(h_probs, generator=generator)
        return h

    def parameters64(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(W, b, c)`` detached, in float64."""
        return tuple(p.detach().double() for p in (self.weight, self.visible_bias, self.hidden_bias))

    @torch.no_grad()
    def log_z_exact(self, chunk: int = 2**14) -> Tensor:
        """``log Z`` by summing over every state of the smaller side, in float64.

        Refuses RBMs whose smaller side exceeds :data:`EXACT_LIMIT` units (the sum has 2^n terms).
        """
        return torch.logsumexp(self._smaller_side_log_probs("log_z_exact", chunk), 0)

    def _smaller_side_log_probs(self, caller: str, chunk: int = 2**14) -> Tensor:
        """Unnormalised ``log p`` of every state of the smaller side (``2^n``, float64): ``-F(h)``
        when it is ``h``, else ``-F'(u) = c.u + sum_i softplus(b_i + (W u)_i)``."""
        n = min(self.units, self.hidden)
        if n > EXACT_LIMIT:
            raise ValueError(
                f"{caller}: the smaller side has {n} units, 2^{n} states; enumeration is limited "
                f"to {EXACT_LIMIT} units (estimate log Z with ais instead)"
            )
        weight, b, c = self.parameters64()
        if self.hidden <= self.units:
            weight, b, c = weight.T, c, b
        parts = []
        for start in range(0, 2**n, chunk):
            states = binary_states(n, start, min(start + chunk, 2**n), weight)
            parts.append(states @ b + F.softplus(c + states @ weight).sum(-1))
        return torch.cat(parts)

    @torch.no_grad()
    def sample_exact(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact, independent draws of ``h ~ p(h)``, ``(n, D)``, by enumerating the smaller side
        (at most :data:`EXACT_LIMIT` units): ``h`` from its enumerated marginal, or ``u`` from its
        own and then ``h ~ p(h | u)``. Reverse AIS from these is conservative in expectation."""
        _positive("n", n)
        log_p = self._smaller_side_log_probs("sample_exact")
        pick = torch.multinomial((log_p - log_p.max()).exp(), n, replacement=True, generator=generator)
        states = _states_of(pick, min(self.units, self.hidden)).to(self.weight)
        if self.units < self.hidden:
            return states
        probs = torch.sigmoid(self.visible_bias + states @ self.weight.T)
        return torch.bernoulli(probs, generator=generator)


SCHEDULES = ("piecewise", "linear")


def temperatures(count: int, schedule: str = "piecewise") -> Tensor:
    """``count + 1`` inverse temperatures from 0 to 1 (float64).

    ``"piecewise"`` spaces them as Salakhutdinov and Murray (2008) did (500, 4,000 and 10,000 of
    their 14,500 over [0, 0.5], [0.5, 0.9] and [0.9, 1]): densest where ``p`` is sharpest.
    ``"linear"`` spaces them evenly.
    """
    _positive("temperatures", count)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if schedule == "linear" or count < 3:
        return torch.linspace(0, 1, count + 1, dtype=torch.float64)
    first = max(1, round(count * 500 / 14500))
    second = max(1, round(count * 4000 / 14500))
    third = count - first - second
    return torch.cat([
        torch.linspace(0, 0.5, first + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.5, 0.9, second + 1, dtype=torch.float64)[:-1],
        torch.linspace(0.9, 1, third + 1, dtype=torch.float64),
    ])  # fmt: skip


@dataclass(frozen=True)
class AISEstimate:
    """What one AIS run found: ``log Z`` and the spread behind it.

    ``log_weights`` (chains,) are the float64 log importance weights; forward they estimate
    ``Z / Z_0``, in reverse ``Z_0 / Z``.
    """

    log_weights: Tensor
    log_z_base: float
    reverse: bool

    def _log_mean(self, width: float = 0.0) -> float:
        """``log(mean(w) + width * se(w))`` computed stably (``-inf`` if not positive)."""
        top = self.log_weights.max()
        w = (self.log_weights - top).exp()
        value = w.mean() + width * w.std() / math.sqrt(w.numel()) if w.numel() > 1 else w.mean()
        return float(top + value.log()) if value > 0 else -math.inf

    @property
    def log_z(self) -> float:
        """The estimate of ``log Z``."""
        sign = -1.0 if self.reverse else 1.0
        return self.log_z_base + sign * self._log_mean()

    def interval(self, width: float = 3.0) -> tuple[float, float]:
        """``log Z`` at the mean weight ``-/+ width`` standard errors (Salakhutdinov and Murray's
        "+-3 standard deviations"); the low end is ``-inf`` (or, in reverse, the high end ``inf``)
        when the weights are too spread for the interval to stay positive."""
        low, high = self._log_mean(-width), self._log_mean(width)
        if self.reverse:
            return self.log_z_base - high, self.log_z_base - low
        return self.log_z_base + low, self.log_z_base + high

    @property
    def effective_chains(self) -> float:
        """Kish's effective sample size of the weights, ``(sum w)^2 / sum w^2``."""
        w = (self.log_weights - self.log_weights.max()).exp()
        return float(w.sum() ** 2 / (w**2).sum())

    def report(self) -> dict:
        low, high = self.interval()
        return {
            "log_z": self.log_z,
            "interval_3se": [low, high],
            "log_weight_sd": float(self.log_weights.std()) if self.log_weights.numel() > 1 else 0.0,
            "effective_chains": self.effective_chains,
            "chains": int(self.log_weights.numel()),
        }


@torch.no_grad()
def ais(
    rbm: RBM,
    chains: int = 100,
    steps: int = 1000,
    base_logits: Tensor | None = None,
    schedule: str = "piecewise",
    generator: torch.Generator | None = None,
    reverse_from: Tensor | None = None,
) -> AISEstimate:
    """Annealed importance sampling for ``rbm``'s ``log Z`` (module docstring).

    Args:
        chains: independent annealing runs (ignored with ``reverse_from``: one per given state).
        steps: intermediate temperatures (one Gibbs sweep each).
        base_logits: ``a`` of the factorial base distribution, (D,); zeros (uniform) if not given.
            The closer ``p_0`` is to ``p`` (e.g. ``p``'s marginals), the less the weights spread.
        schedule: see :func:`temperatures`.
        generator: random source of the chains (the global one if not given).
        reverse_from: states (chains, D) drawn (approximately) from ``p``: anneal from ``p`` back to
            ``p_0`` instead, a conservative estimate (it over-estimates ``log Z`` on average).
    """
    _positive("chains", chains)
    weight, b, c = rbm.weight.detach(), rbm.visible_bias.detach(), rbm.hidden_bias.detach()
    a = torch.zeros_like(b) if base_logits is None else base_logits.detach().to(b)
    if a.shape != b.shape or not torch.isfinite(a).all():
        raise ValueError(f"base_logits: expected {tuple(b.shape)} finite logits, got {tuple(a.shape)}")
    betas = temperatures(steps, schedule).tolist()
    if reverse_from is None:
        h = torch.bernoulli(torch.sigmoid(a).expand(chains, -1).contiguous(), generator=generator)
    else:
        if reverse_from.dim() != 2 or reverse_from.shape[1] != rbm.units:
            raise ValueError(
                f"reverse_from: expected states (chains, {rbm.units}), got {tuple(reverse_from.shape)}"
            )
        h, betas = reverse_from.to(b), betas[::-1]
    slope = (b - a).double()
    log_w = torch.zeros(h.shape[0], dtype=torch.float64, device=b.device)
    x = c + h @ weight
    for k in range(1, len(betas)):
        previous, beta = betas[k - 1], betas[k]
        x64 = x.double()
        log_w += (beta - previous) * (h.double() @ slope)
        log_w += (F.softplus(beta * x64) - F.softplus(previous * x64)).sum(-1)
        if k < len(betas) - 1:  # a sweep that leaves f_beta invariant
            u = torch.bernoulli(torch.sigmoid(beta * x), generator=generator)
            h_probs = torch.sigmoid((1 - beta) * a + beta * (b + u @ weight.T))
            h = torch.bernoulli(h_probs, generator=generator)
            x = c + h @ weight
    log_z_base = float(F.softplus(a.double()).sum()) + rbm.hidden * math.log(2)
    return AISEstimate(log_w.cpu(), log_z_base, reverse_from is not None)


class RBMPrior(nn.Module):
    """An RBM as the :class:`~probvq.EnergyPrior` of a binary code site: PCD for ``grad log Z``
    during training, ``log Z`` (exact or AIS) before every evaluation.

    * Training (``self.training``): the log-normaliser is ``s - sg(s)`` with
      ``s = -mean_c F(h_c)`` over the persistent chains ``h_c``: its value is 0, so the loss is
      the negative ELBO *up to log Z*, and its gradient is ``-E_chains[grad F] ~ grad log Z``. The
      chains move ``sweeps`` Gibbs sweeps after every optimiser step (``after_step``) under the new
      parameters, and are a buffer, so checkpoints keep them.
    * Evaluation: the log-normaliser is the ``log Z`` that ``before_evaluation`` last computed:
      exact when the RBM's smaller side has at most ``exact_limit`` units, else forward AIS
      from the chains' marginals (optimistic on average), reported with a reverse run beside it
      (from exact samples where the RBM is small enough to draw them, else from the chains) and
      ``conservative_log_z``, the larger estimate, under which the evaluation also reports its
      bounds.

    Args:
        units: D. hidden: M.
        chains: persistent chains. sweeps: Gibbs sweeps per step (PCD-k).
        ais_chains, ais_steps: AIS runs and intermediate temperatures for evaluation.
        reverse_burn_in: extra sweeps of the chains before they start the reverse run.
        sample_sweeps: Gibbs sweeps behind each sample of the prior (``sample``).
    """

    def __init__(
        self,
        units: int,
        hidden: int,
        chains: int = 100,
        sweeps: int = 1,
        ais_chains: int = 100,
        ais_steps: int = 1000,
        reverse_burn_in: int = 100,
        sample_sweeps: int = 1000,
    ) -> None:
        super().__init__()
        for name, value in (("chains", chains), ("sweeps", sweeps), ("ais_chains", ais_chains),
                            ("ais_steps", ais_steps), ("sample_sweeps", sample_sweeps)):  # fmt: skip
            _positive(name, value)
        if not (isinstance(reverse_burn_in, int) and reverse_burn_in >= 0):
            raise ValueError(
                f"reverse_burn_in: expected a non-negative integer, got {reverse_burn_in!r}"
            )
        self.rbm = RBM(units, hidden)
        self.sweeps, self.ais_chains, self.ais_steps = sweeps, ais_chains, ais_steps
        self.reverse_burn_in, self.sample_sweeps = reverse_burn_in, sample_sweeps
        self.exact_limit = EXACT_LIMIT
        """Up to this many units on the RBM's smaller side, evaluation enumerates ``log Z``."""
        self.active = True
        """Whether the prior is in use: its chains move after each step and evaluation computes its
        ``log Z`` (off while a model trains under another prior)."""
        self.register_buffer("chains", torch.bernoulli(torch.full((chains, units), 0.5)))
        self.register_buffer("log_z", torch.tensor(math.nan, dtype=torch.float64))
        self._evaluated: tuple | None = None
        self._report: dict = {}

    @property
    def loss_note(self) -> str | None:
        """What the training loss is short of while this prior trains (on the bar and in the log)."""
        return "ELBO up to log Z" if self.active else None

    def reset_chains(self, probs: Tensor) -> None:
        """Restart the chains from independent draws with unit probabilities ``probs`` (D,)."""
        self.chains.copy_(torch.bernoulli(probs.detach().to(self.chains).expand_as(self.chains)))

    def log_normaliser(self) -> Tensor:
        """``log Z`` as the program uses it (class docstring); evaluation reads no chains."""
        if not self.training:
            return self.log_z
        s = -self.rbm.free_energy(self.chains).mean()
        return s - s.detach()

    @torch.no_grad()
    def sample(self, shape: torch.Size) -> Tensor:
        """Prior draws ``(*shape, D)``: ``sample_sweeps`` sweeps from the bias-only distribution."""
        start = torch.sigmoid(self.rbm.visible_bias).expand(*shape, self.rbm.units)
        return self.rbm.gibbs(torch.bernoulli(start.contiguous()), self.sample_sweeps)

    def prior(self) -> EnergyPrior:
        """The energy prior a code site takes."""
        return EnergyPrior(self.rbm.free_energy, self.log_normaliser(), self.sample)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.active:
            self.chains.copy_(self.rbm.gibbs(self.chains, self.sweeps))

    def _annealed(self, seed: int) -> dict:
        """Forward AIS for the figures, reverse AIS for a conservative estimate beside it, and what
        each one's bias is (module docstring)."""
        generator = torch.Generator(self.chains.device).manual_seed(seed)
        # The chains' marginals, smoothed: a base close to p keeps the weights' spread small.
        marginal = (self.chains.sum(0) + 1) / (self.chains.shape[0] + 2)
        base = torch.logit(marginal)
        forward = ais(self.rbm, self.ais_chains, self.ais_steps, base, generator=generator)
        if min(self.rbm.units, self.rbm.hidden) <= EXACT_LIMIT:  # enumeration was switched off
            start = self.rbm.sample_exact(self.ais_chains, generator)
            origin = "exact samples of p: it over-estimates log Z on average (guaranteed in expectation)"
        else:
            rows = torch.arange(self.ais_chains, device=self.chains.device) % self.chains.shape[0]
            start = self.rbm.gibbs(self.chains[rows], self.reverse_burn_in, generator)
            origin = (
                f"the persistent chains after {self.reverse_burn_in} more Gibbs sweeps, approximate "
                "samples of p: it over-estimates log Z on average only as far as they mix, so it "
                "is not a guarantee"
            )
        reverse = ais(self.rbm, steps=self.ais_steps, base_logits=base, generator=generator,
                      reverse_from=start)  # fmt: skip
        report = {
            "method": "ais",
            "log_z": forward.log_z,
            "steps": self.ais_steps,
            "forward": {
                **forward.report(),
                "bias": "forward AIS under-estimates log Z on average, so the ELBO and IWAE "
                "figures computed with it (log_z) are optimistic, biased upwards",
            },
            "reverse": {**reverse.report(), "bias": f"reverse AIS from {origin}"},
            "conservative_log_z": max(forward.log_z, reverse.log_z),
        }
        return report

    @torch.no_grad()
    def before_evaluation(self, seed: int) -> dict | None:
        """Compute ``log Z`` for the current parameters (cached until they change); its report
        (``None`` while the prior is not in use)."""
        if not self.active:
            return None
        state = [self.chains, *self.rbm.parameters()]
        key = (tuple((id(t), t._version) for t in state), self.ais_chains, self.ais_steps, seed,
               self.exact_limit)  # fmt: skip
        if key == self._evaluated:
            return self._report
        if min(self.rbm.units, self.rbm.hidden) <= self.exact_limit:
            log_z = float(self.rbm.log_z_exact())
            report = {"method": "exact", "log_z": log_z}
        else:
            report = self._annealed(seed)
            log_z = report["log_z"]
        self.log_z.fill_(log_z)
        self._evaluated, self._report = key, report
        return report
