import math

import pyro
import pytest
import torch
from conftest import CODEBOOK_FAMILIES

from probvq.build import build, load_data, resolve
from probvq.config import RunConfig
from probvq.inference import FAMILIES, evaluate, fit
from probvq.inference.objectives.terms import elbo_terms, run_traces

SMALL = dict(
    num_codes=16, code_dim=8, hidden=16, res_blocks=1, batch_size=32, train_limit=1500, valid_size=200
)


def setup(family, **overrides):
    config = RunConfig(family=family, quiet=True, **{**SMALL, **overrides})
    dataset = load_data(config)
    config = resolve(config, dataset)
    pyro.set_rng_seed(config.seed)
    vae, fam = build(config, dataset)
    prepare = vae.likelihood.prepare
    return config, vae, fam, prepare(dataset.train), prepare(dataset.valid)[:200]


@pytest.mark.parametrize("name", CODEBOOK_FAMILIES)
def test_each_family_improves_its_exact_elbo(name):
    config, vae, family, train_x, valid_x = setup(name, max_steps=150, eval_every=150)
    before = evaluate(vae, family, valid_x)["exact_elbo"]
    after = fit(vae, family, train_x, valid_x, config).history[-1]["valid"]["exact_elbo"]
    margin = 5 * math.hypot(before["se"], after["se"])
    assert after["mean"] > before["mean"] + max(200.0, margin), (before, after)


def test_ema_codebook_trains_and_moves_the_codebook():
    config, vae, family, train_x, valid_x = setup(
        "vq", family_settings={"ema": True}, max_steps=60, eval_every=60
    )
    assert family.ema
    start = vae.codebook.weight.detach().clone()
    before = evaluate(vae, family, valid_x)["exact_elbo"]["mean"]
    after = fit(vae, family, train_x, valid_x, config).history[-1]["valid"]["exact_elbo"]["mean"]
    assert after > before + 50
    assert not torch.allclose(vae.codebook.weight.detach(), start)


def test_same_seed_same_result_and_another_seed_differs():
    def run(seed):
        config, vae, family, train_x, valid_x = setup("sq", max_steps=20, eval_every=10, seed=seed)
        history = fit(vae, family, train_x, valid_x, config).history
        return [h["loss"] for h in history], vae.state_dict()

    losses_a, state_a = run(3)
    losses_b, state_b = run(3)
    losses_c, _ = run(4)
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert losses_a != losses_c


def test_one_model_object_trains_under_every_family_by_one_argument():
    _, vae, _, train_x, _ = setup("vq")
    x = train_x[:16]
    for name in CODEBOOK_FAMILIES:
        family = FAMILIES[name].build(vae.code_sites)
        loss = family.elbo().differentiable_loss(family.wrap(vae.model), family.wrap(vae.guide), x)
        vae.zero_grad()
        loss.backward()
        assert torch.isfinite(loss), name
        assert vae.encoder[0].weight.grad.abs().sum() > 0, name


def test_straight_through_carries_the_reconstruction_gradient_to_the_encoder():
    _, vae, family, train_x, _ = setup("vq")
    model_trace, guide_trace = run_traces(family.wrap(vae.model), family.wrap(vae.guide), train_x[:8])
    distortion = elbo_terms(model_trace, guide_trace).distortion["x"].sum()
    distortion.backward()
    assert vae.encoder[0].weight.grad.abs().sum() > 0
    assert vae.codebook.weight.grad is None  # the codebook learns from its own loss only


def test_evaluation_reports_exact_surrogate_gap_and_usage():
    _, vae, family, _, valid_x = setup("rr")
    result = evaluate(vae, family, valid_x[:100], batch_size=40)
    assert result["examples"] == 100
    for key in ("exact_elbo", "surrogate_elbo", "surrogate_gap", "reconstruction_mse"):
        assert math.isfinite(result[key]["mean"]) and result[key]["se"] > 0
    gap = result["surrogate_elbo"]["mean"] - result["exact_elbo"]["mean"]
    assert result["surrogate_gap"]["mean"] == pytest.approx(gap, abs=1e-6)
    assert result["exact_bits_per_dim"] == pytest.approx(
        -result["exact_elbo"]["mean"] / (784 * math.log(2)), rel=1e-6
    )
    assert 1.0 <= result["perplexity"]["z"] <= 16.0
    assert 0 <= result["dead_codes"]["z"] <= 16
    total = result["distortion"]["x"]["mean"] + result["rate"]["z"]["mean"]
    assert -total == pytest.approx(result["exact_elbo"]["mean"], rel=1e-5)


def test_evaluation_is_seeded_and_leaves_the_callers_random_stream_alone():
    _, vae, family, _, valid_x = setup("sq")
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    first = evaluate(vae, family, valid_x[:50], seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    assert evaluate(vae, family, valid_x[:50], seed=5) == first


def test_training_on_empty_data_is_refused():
    config, vae, family, train_x, valid_x = setup("vq")
    with pytest.raises(ValueError, match="non-empty"):
        fit(vae, family, train_x[:0], valid_x, config)
    with pytest.raises(ValueError, match="empty"):
        evaluate(vae, family, valid_x[:0])


@pytest.mark.parametrize("grid", [8, 4])
def test_rgb_images_train_with_the_discretised_logistic(grid):
    config, vae, family, train_x, valid_x = setup(
        "sq", dataset="synthetic-rgb", grid=grid, max_steps=40, eval_every=40, train_limit=400
    )
    assert config.likelihood == "logistic" and train_x.shape[1:] == (3, 32, 32)
    assert float(train_x.min()) >= -1.0 and float(train_x.max()) <= 1.0
    before = evaluate(vae, family, valid_x[:100])
    after = fit(vae, family, train_x, valid_x[:100], config).history[-1]["valid"]
    assert after["exact_bits_per_dim"] < before["exact_bits_per_dim"] - 0.5
    bits = -after["exact_elbo"]["mean"] / (3 * 32 * 32 * math.log(2))
    assert after["exact_bits_per_dim"] == pytest.approx(bits)


@pytest.mark.parametrize(
    ("transform", "match"),
    [
        (lambda x: x.to(torch.uint8), "float"),
        (lambda x: x * 0.5, "binary"),
        (lambda x: x.masked_fill(torch.rand_like(x) < 0.01, float("nan")), "NaN"),
        (lambda x: x.flatten(1), "shape"),
    ],
)
def test_fit_and_evaluate_check_the_data_before_any_work(transform, match):
    config, vae, family, train_x, valid_x = setup("vq")
    bad = transform(train_x[:64])
    with pytest.raises(ValueError, match=match):
        fit(vae, family, bad, valid_x, config)
    with pytest.raises(ValueError, match=match):
        evaluate(vae, family, bad)
    assert not bool(vae.codebook.initialised)  # no k-means on bad features


def test_a_family_built_for_another_model_is_refused():
    _, vae, _, train_x, _ = setup("sq")
    _, other, _, _, _ = setup("sq")
    family = FAMILIES["sq"].cls(other.code_sites)
    with pytest.raises(ValueError, match="another model"):
        family.wrap(vae.model)(train_x[:4])


def test_trained_models_and_families_pickle():
    import pickle

    config, vae, family, train_x, valid_x = setup("rr", max_steps=3, eval_every=3)
    fit(vae, family, train_x, valid_x, config)
    clone = pickle.loads(pickle.dumps((vae, family)))
    assert torch.equal(clone[0].codebook.weight, vae.codebook.weight)
