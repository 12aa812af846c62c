"""``gumbel``: q from the family's read-out of the encoder features, Concrete samples, analytic KL."""

from __future__ import annotations

import pyro
import pytest
import torch

from probvq.codebook import Codebook
from probvq.inference import FAMILIES
from probvq.inference.objectives.terms import elbo_terms, run_traces
from probvq.sites import CodeGroup, CodeSite, code


class Program(torch.nn.Module):
    """One grid of 3 positions over K = 4 codes of D = 2, features given by hand."""

    def __init__(self, group: bool = False) -> None:
        super().__init__()
        sites = [CodeSite(f"z{i}", Codebook(4, 2, init="normal"), (3,)) for i in (1, 2)]
        self.codes = CodeGroup("g", sites) if group else sites[0]
        self.sites = sites if group else sites[:1]
        self.prior = torch.log_softmax(torch.randn(3, 4), -1)
        self.zhat = torch.nn.Parameter(torch.randn(5, 3, 2))

    def priors(self):
        logits = self.prior.expand(5, 3, 4)
        return [logits] * len(self.sites) if isinstance(self.codes, CodeGroup) else logits

    def model(self, x=None) -> None:
        with pyro.plate("data", 5):
            code(self.codes, self.priors())

    def guide(self, x=None) -> None:
        with pyro.plate("data", 5):
            code(self.codes, self.priors(), features=self.zhat)


def test_q_is_the_softmax_of_the_readout_and_the_rate_is_the_analytic_kl():
    torch.manual_seed(0)
    program = Program()
    fam = FAMILIES["gumbel"].build(program.sites)
    model, guide = fam.wrap(program.model, pyro_params=False), fam.wrap(program.guide, pyro_params=False)
    model_trace, guide_trace = run_traces(model, guide)
    readout = fam.readout["z1"]
    log_q = torch.log_softmax(program.zhat @ readout.weight.T + readout.bias, -1)  # by hand
    fn = guide_trace.nodes["z1"]["fn"].base_dist
    torch.testing.assert_close(torch.log_softmax(fn.logits, -1), log_q)
    rate = elbo_terms(model_trace, guide_trace).rate["z1"]
    kl = (log_q.exp() * (log_q - program.prior)).sum((-2, -1))
    torch.testing.assert_close(rate, kl)


def test_exact_codes_follow_q_and_training_samples_are_straight_through_concrete():
    torch.manual_seed(1)
    program = Program()
    fam = FAMILIES["gumbel"].build(program.sites, {"temperature": 0.7, "temperature_min": 0.7})
    guide = fam.wrap(program.guide, pyro_params=False)
    readout = fam.readout["z1"]
    q = torch.softmax(program.zhat @ readout.weight.T + readout.bias, -1).detach()
    counts = torch.zeros_like(q)
    draws = 4000
    with torch.no_grad(), fam.exact():
        for _ in range(draws):
            value = run_traces(program.model, guide)[1].nodes["z1"]["value"]
            counts += torch.nn.functional.one_hot(program.sites[0].space.index_of(value), 4)
    assert (counts / draws - q).abs().max() < 4 * (0.25 / draws) ** 0.5
    value = run_traces(fam.wrap(program.model, pyro_params=False), guide)[1].nodes["z1"]["value"]
    embedded = program.sites[0].space.value_of(value)
    table = program.sites[0].space.weight
    assert torch.isclose(embedded.unsqueeze(-2), table).all(-1).any(-1).all()  # hard forward
    embedded.sum().backward()
    assert readout.weight.grad is not None and readout.weight.grad.abs().sum() > 0  # soft gradient


def test_residual_groups_are_refused_by_name():
    program = Program(group=True)
    fam = FAMILIES["gumbel"].build(program.sites)
    with pytest.raises(ValueError, match="'gumbel' family does not quantise residual code groups"):
        run_traces(
            fam.wrap(program.model, pyro_params=False), fam.wrap(program.guide, pyro_params=False)
        )
