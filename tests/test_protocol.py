"""The code-site protocol: several sites, top-down priors, nested families, binary units."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from probvq import DATA_PLATE, BinaryUnits, Codebook, CodeGroup, CodeSite, code, prior_factor
from probvq.config import RunConfig
from probvq.inference import (
    FAMILIES,
    RR,
    SQ,
    VQ,
    FamilyStack,
    TemperatureSchedule,
    elbo_terms,
    fit,
    run_traces,
)
from probvq.inference.objectives.terms import log_weight, observed_dims


class TwoLevel(nn.Module):
    """z_top (2 positions) -> prior logits of z_bottom (3 positions) -> x in {0,1}^8."""

    def __init__(self):
        super().__init__()
        self.top_book, self.bottom_book = Codebook(4, 3, init="normal"), Codebook(5, 3, init="normal")
        self.top = CodeSite("top", self.top_book, (2,))
        self.bottom = CodeSite("bottom", self.bottom_book, (3,))
        self.topdown = nn.Linear(6, 15)
        self.decoder = nn.Linear(9, 8)
        self.encoder = nn.Linear(8, 15)

    @property
    def code_sites(self):
        return [self.top, self.bottom]

    def bottom_prior(self, z_top):
        return self.topdown(z_top.flatten(-2)).view(-1, 3, 5)

    def model(self, x, extra=None):
        """``extra(x)``, if given, adds sites inside the data plate."""
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z_top = code(self.top, self.top.uniform_logits((x.shape[0],)))
            z_bottom = code(self.bottom, self.bottom_prior(z_top))
            pyro.sample(
                "x", dist.Bernoulli(logits=self.decoder(z_bottom.flatten(-2))).to_event(1), obs=x
            )
            if extra is not None:
                extra(x)

    def guide(self, x, extra=None):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            h = self.encoder(x)
            z_top = code(self.top, self.top.uniform_logits((x.shape[0],)), h[:, :6].view(-1, 2, 3))
            code(self.bottom, self.bottom_prior(z_top), h[:, 6:].view(-1, 3, 3))
            if extra is not None:
                extra(x)


@pytest.fixture
def two_level():
    return TwoLevel()


def test_nested_families_answer_their_own_sites(two_level):
    sq = SQ(two_level.code_sites, claims=["top"])
    rr = RR(two_level.code_sites, claims=["bottom"])
    model = rr.wrap(sq.wrap(two_level.model))
    guide = rr.wrap(sq.wrap(two_level.guide))
    x = torch.bernoulli(torch.full((16, 8), 0.5))
    model_trace, guide_trace = run_traces(model, guide, x)
    assert "top.deq" in guide_trace.nodes and "bottom.deq" not in guide_trace.nodes
    terms = elbo_terms(model_trace, guide_trace)
    assert set(terms.rate) == {"top", "top.deq", "bottom"}
    loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model, guide, x)
    loss.backward()
    # the top-down prior trains through the bottom KL and RR's prior mixing weights
    assert two_level.topdown.weight.grad.abs().sum() > 0
    assert sq.log_var["top"].grad is not None and rr.log_var["bottom"].grad is not None


def test_a_site_no_family_claims_is_refused_in_the_guide(two_level):
    vq = VQ(two_level.code_sites, claims=["top"])
    with pytest.raises(RuntimeError, match=r"'bottom'.*no guide family"):
        vq.wrap(two_level.guide)(torch.zeros(2, 8))


def test_without_a_family_the_model_samples_ancestrally(two_level):
    trace = pyro.poutine.trace(two_level.model).get_trace(torch.zeros(3, 8))
    bottom = two_level.bottom_book.value_of(trace.nodes["bottom"]["value"])
    assert bottom.shape == (3, 3, 3)
    rows = two_level.bottom_book.weight.detach()
    assert torch.all((bottom[..., None, :] - rows).abs().sum(-1).min(-1).values < 1e-6)


@pytest.mark.parametrize("cls, reads", [(VQ, True), (SQ, True), (RR, False)])
def test_learned_prior_logits_get_the_hand_written_kl_gradient(two_level, cls, reads):
    """The prior logits' gradient is that of ``KL(q || softmax(l))`` written out by hand, summed
    over the batch. VQ's and SQ's posteriors do not read the prior, so this holds whatever the
    likelihood reads; RR's mixes with it, so there the likelihood ignores z and the gradient runs
    through q's logits as well. (A halved KL fails it.)"""
    torch.manual_seed(0)
    logits, features, site = nn.Parameter(torch.randn(2, 4)), torch.randn(5, 2, 3), two_level.top

    def model(x):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z = code(site, logits.expand(x.shape[0], 2, 4))
            pyro.sample("x", dist.Normal(z.sum((-1, -2)) if reads else torch.zeros(5), 1.0), obs=x)

    def guide(x):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            code(site, logits.expand(x.shape[0], 2, 4), features=features)

    family = cls([site])
    loss = family.elbo().differentiable_loss(family.wrap(model), family.wrap(guide), torch.zeros(5))
    (found,) = torch.autograd.grad(loss, logits)
    log_p = logits.log_softmax(-1)
    distances = (features[..., None, :] - two_level.top_book.weight.detach()).pow(2).sum(-1)
    if cls is VQ:
        rate = -log_p.expand(5, 2, 4).gather(-1, distances.argmin(-1, keepdim=True))
    else:
        var = family.log_var["top"].detach().exp()
        q_logits = -distances / (2 * var)
        if cls is RR:
            q_logits = log_p - 1.5 * var.log() + q_logits
        log_q = q_logits.log_softmax(-1)
        rate = log_q.exp() * (log_q - log_p)
    (expected,) = torch.autograd.grad(rate.sum(), logits)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


def test_binary_units_are_a_code_space_without_codebook():
    site = CodeSite("h", BinaryUnits(), (8,))

    def model(n):
        with pyro.plate(DATA_PLATE, n):
            return code(site, torch.tensor([-3.0, 3.0]).expand(n, 8, 2))

    h = model(2000)
    assert h.shape == (2000, 8) and set(h.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(h.mean(), torch.sigmoid(torch.tensor(6.0)), atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="BinaryUnits"):
        VQ([site])


def test_code_checks_shapes_before_any_work(two_level):
    with pytest.raises(ValueError, match="prior"):
        code(two_level.top, torch.zeros(5, 2, 3))
    answered = VQ(two_level.code_sites).wrap(code)
    with pytest.raises(ValueError, match="features"):
        answered(two_level.top, torch.zeros(5, 2, 4), features=torch.zeros(5, 2, 4))
    with pytest.raises(TypeError, match="prior"):
        code(two_level.top, [0.0, 1.0])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda s: CodeSite("not a name", s, (2,)), "identifier"),
        (lambda s: CodeSite("z", s, (0,)), "grid"),
        (lambda s: VQ([CodeSite("z", s, (2,))], claims=["w"]), "claims"),
        (lambda s: VQ([CodeSite("z", s, (2,))], beta=-1), "beta"),
        (lambda s: VQ([CodeSite("z", s, (2,))], decay=1.0), "decay"),
        (lambda s: SQ([CodeSite("z", s, (2,))], init_var=0.0), "init_var"),
        (lambda s: RR([CodeSite("z", s, (2,))], init_var=-1.0), "init_var"),
        (lambda s: TemperatureSchedule(initial=0.0), "temperature initial"),
        (lambda s: TemperatureSchedule(minimum=-1.0), "temperature minimum"),
        (lambda s: TemperatureSchedule(rate=-1.0, fraction=None), "anneal rate"),
        (lambda s: TemperatureSchedule(fraction=1.5), "anneal fraction"),
        (lambda s: TemperatureSchedule(rate=0.1, fraction=0.5), "anneal"),
        (lambda s: TemperatureSchedule(initial=0.5, minimum=1.0), "temperature minimum"),
    ],
)
def test_bad_arguments_are_refused_clearly(make, match):
    with pytest.raises(ValueError, match=match):
        make(Codebook(4, 3))


def test_temperature_schedule_decays_exponentially_to_its_floor():
    schedule = TemperatureSchedule(initial=2.0, rate=0.01, minimum=0.5, fraction=None)
    assert schedule(0) == 2.0
    assert schedule(100) == pytest.approx(2.0 * torch.e**-1)
    assert schedule(10_000) == 0.5
    family = SQ(
        [CodeSite("z", Codebook(4, 3), (2,))], temperature=2.0, temperature_min=0.5, anneal_rate=0.01
    )
    for _ in range(100):
        family.after_step()
    assert family.temperature == pytest.approx(schedule(100))
    with family.exact():
        assert family.relaxation() is None


def test_a_family_stack_trains_and_evaluates_as_one_family(two_level):
    stack = FamilyStack(
        SQ(two_level.code_sites, claims=["top"]), RR(two_level.code_sites, claims=["bottom"])
    )
    assert stack.name == "sq+rr"
    with stack.exact():
        assert all(family.is_exact for family in stack.families)
    assert not any(family.is_exact for family in stack.families)
    x = torch.bernoulli(torch.full((64, 8), 0.3))
    config = RunConfig(max_steps=6, eval_every=3, batch_size=16, valid_size=32, quiet=True)
    history = fit(two_level, stack, x, x, config).history
    assert [record["step"] for record in history] == [3, 6]
    assert set(history[-1]["valid"]["rate"]) == {"top", "top.deq", "bottom"}
    assert int(stack.families[0].steps) == 6 and int(stack.families[1].steps) == 6


def test_a_family_stack_refuses_overlapping_claims(two_level):
    with pytest.raises(ValueError, match="claimed twice"):
        FamilyStack(SQ(two_level.code_sites), RR(two_level.code_sites, claims=["bottom"]))


def test_a_prior_factor_is_reported_as_its_latents_rate(two_level):
    energy = nn.Parameter(torch.tensor(0.7))

    def factors(x):
        prior_factor("top", "top.energy", -energy.expand(x.shape[0]))
        pyro.factor("x.bonus", torch.full((x.shape[0],), 0.25))

    def model(x):
        two_level.model(x, factors)

    family = FamilyStack(
        SQ(two_level.code_sites, claims=["top"]), RR(two_level.code_sites, claims=["bottom"])
    )
    x = torch.bernoulli(torch.full((16, 8), 0.5))
    pyro.set_rng_seed(3)
    plain = elbo_terms(*run_traces(family.wrap(two_level.model), family.wrap(two_level.guide), x))
    pyro.set_rng_seed(3)
    traces = run_traces(family.wrap(model), family.wrap(two_level.guide), x)
    terms = elbo_terms(*traces)
    assert set(terms.distortion) == {"x", "x.bonus"} and set(terms.rate) == set(plain.rate)
    torch.testing.assert_close(terms.rate["top"], plain.rate["top"] + 0.7)
    torch.testing.assert_close(terms.distortion["x.bonus"], torch.full((16,), -0.25))
    assert observed_dims(traces[0]) == 8  # factors observe nothing
    loss = family.elbo().differentiable_loss(family.wrap(model), family.wrap(two_level.guide), x)
    loss.backward()
    torch.testing.assert_close(energy.grad, torch.tensor(16.0))  # each example pays the energy


def test_a_prior_factor_of_no_latent_is_refused(two_level):
    def model(x):
        two_level.model(x, lambda x: prior_factor("nothing", "f", torch.zeros(x.shape[0])))

    family = SQ(two_level.code_sites)
    with pytest.raises(ValueError, match="prior factor of 'nothing'"):
        elbo_terms(*run_traces(family.wrap(model), family.wrap(two_level.guide), torch.zeros(2, 8)))


def test_latents_sampled_only_in_the_guide_are_refused_by_every_bound(two_level):
    def guide(x):
        two_level.guide(x, lambda x: pyro.sample("u", pyro.distributions.Normal(0.0, 1.0)))

    family = SQ(two_level.code_sites)
    model, guide = family.wrap(two_level.model), family.wrap(guide)
    x = torch.zeros(3, 8)
    traces = run_traces(model, guide, x)
    for bound in (elbo_terms, log_weight):
        with pytest.raises(ValueError, match="'u': a latent sampled only in the guide"):
            bound(*traces)
    with pytest.raises(ValueError, match="'u': a latent sampled only in the guide"):
        family.elbo().differentiable_loss(model, guide, x)


def test_a_code_site_registers_its_space_with_whoever_holds_the_site():
    class OnlyTheSite(nn.Module):
        def __init__(self):
            super().__init__()
            self.z = CodeSite("z", Codebook(5, 3), (2,))

    holder = OnlyTheSite()
    assert any(p is holder.z.space.weight for p in holder.parameters())
    assert {"z.space.weight", "z.space.usage", "z.space.ema_sum"} <= set(holder.state_dict())
    holder.to(torch.float64)
    assert holder.z.space.weight.dtype == torch.float64
    group = CodeGroup("g", [CodeSite("a", Codebook(3, 2), (2,)), CodeSite("b", Codebook(3, 2), (2,))])
    assert len(list(group.parameters())) == 2


def test_codes_carry_their_index_through_a_trace_and_a_copy(two_level):
    family = RR(two_level.code_sites, straight_through=False)
    x = torch.bernoulli(torch.full((64, 8), 0.5))
    with torch.no_grad():
        _, guide_trace = run_traces(family.wrap(two_level.model), family.wrap(two_level.guide), x)
    site = guide_trace.nodes["bottom"]
    relaxed = site["value"]
    index = two_level.bottom_book.index_of(relaxed)
    # a relaxed value is not its code's embedding, yet scores its own code, as does any copy of it
    assert (
        two_level.bottom_book.value_of(relaxed) - two_level.bottom_book.weight[index]
    ).abs().max() > 0
    for copy in (relaxed.clone(), relaxed.detach().double().float(), relaxed.to("cpu", copy=True)):
        torch.testing.assert_close(site["fn"].log_prob(copy), site["fn"].log_prob(relaxed))
    assert not hasattr(two_level.bottom_book, "_memo")


@pytest.mark.parametrize("name", ["vq", "sq", "rr"])
def test_pyros_loss_interface_is_the_differentiable_loss_and_its_gradient(name, tiny, tiny_data):
    # What pyro.infer.SVI calls: loss (evaluate_loss) and loss_and_grads (step), on one draw each.
    fam = FAMILIES[name].build(tiny.code_sites)
    model, guide = fam.wrap(tiny.model, pyro_params=False), fam.wrap(tiny.guide, pyro_params=False)
    elbo = fam.elbo(max_plate_nesting=1)
    params = [p for p in (*tiny.parameters(), *fam.parameters()) if p.requires_grad]
    pyro.set_rng_seed(5)
    want = elbo.differentiable_loss(model, guide, tiny_data)
    grads = torch.autograd.grad(want, params, allow_unused=True)
    pyro.set_rng_seed(5)
    assert elbo.loss(model, guide, tiny_data) == pytest.approx(float(want.detach()), rel=1e-6)
    pyro.set_rng_seed(5)
    assert elbo.loss_and_grads(model, guide, tiny_data) == pytest.approx(float(want.detach()), rel=1e-6)
    for param, grad in zip(params, grads, strict=True):
        if grad is not None:
            torch.testing.assert_close(param.grad, grad)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_stack_is_its_families_together_and_refuses_overlaps_and_mixed_elbos(tiny, tiny_data):
    sites = [CodeSite(name, Codebook(3, 2, init="normal"), (2,)) for name in ("a", "b", "c")]
    stack = FamilyStack(VQ(sites, claims=["a"]), VQ(sites, claims=["b"]), SQ(sites, claims=["c"]))
    assert stack.sites == dict(zip("abc", sites, strict=True)) and stack.name == "vq+vq+sq"
    assert stack.elbo_class is VQ.elbo_class and FamilyStack(SQ(sites, claims=["c"])).name == "sq"
    with pytest.raises(ValueError, match=r"\['a'\] are claimed twice"):
        FamilyStack(VQ(sites, claims=["a"]), VQ(sites, claims=["b"]), VQ(sites, claims=["a"]))
    with pytest.raises(ValueError, match="different ELBOs"):
        FamilyStack(VQ(sites, claims=["a"]), FAMILIES["score"].cls(sites, claims=["b"]))
    # wrapped like a family: by default the program's parameters go to Pyro's store, for SVI
    pyro.clear_param_store()
    tiny_stack = FamilyStack(VQ(tiny.code_sites))
    pyro.poutine.trace(tiny_stack.wrap(tiny.model)).get_trace(tiny_data)
    names = list(pyro.get_param_store().keys())
    assert any(name.endswith("decoder.0.weight") for name in names)
    pyro.clear_param_store()
    pyro.poutine.trace(tiny_stack.wrap(tiny.model, pyro_params=False)).get_trace(tiny_data)
    assert not list(pyro.get_param_store().keys())
