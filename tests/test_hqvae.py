"""HQ-VAE: injected and residual layers, every family, the layer-collapse score, per-site families."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pyro
import pytest
import torch
from conftest import CODEBOOK_FAMILIES, built_run

from probvq.build import build_family, load_data
from probvq.cli import main
from probvq.config import RunConfig
from probvq.inference import FAMILIES, FamilyStack, evaluate, fit
from probvq.inference.objectives.terms import run_traces
from probvq.likelihoods import Bernoulli
from probvq.models.hqvae import HQVAE, levels_of, parse_layers
from probvq.sites import CodeGroup


def tiny(layers, side=16, grid=2, num_codes=4, code_dim=2, hidden=8, seed=0, **kwargs):
    torch.manual_seed(seed)
    return HQVAE((1, side, side), Bernoulli(), layers, num_codes, code_dim, grid, hidden, 1, **kwargs)


def family(vae, name, **settings):
    return FAMILIES[name].build(vae.code_sites, settings)


def binary(n, side=16, seed=1):
    return torch.bernoulli(
        torch.full((n, 1, side, side), 0.3), generator=torch.Generator().manual_seed(seed)
    )


def train(vae, fam, x, steps, lr=3e-3, batch_size=16):
    config = RunConfig(
        max_steps=steps,
        epochs=10**6,
        batch_size=batch_size,
        lr=lr,
        eval_every=steps,
        valid_size=len(x),
        quiet=True,
    )
    fit(vae, fam, x, x, config)


def test_layer_kinds_make_levels_top_first():
    assert levels_of(parse_layers("injected,injected")) == [1, 1]
    assert levels_of(parse_layers("residual,residual,residual")) == [3]
    assert levels_of(parse_layers(["injected", "residual", "injected", "residual", "residual"])) == [
        2,
        3,
    ]
    vae = tiny("injected,residual,injected")
    assert [s.name for s in vae.code_sites] == ["z1", "z2", "z3"]
    assert [s.grid for s in vae.code_sites] == [(2, 2), (2, 2), (4, 4)]
    assert isinstance(vae.levels[0].codes, CodeGroup) and vae.levels[1].codes is vae.code_sites[2]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("injected,stacked", "layers"),
        ("", "layers"),
        ("injected,injected,injected,injected", "image side"),
    ],
)
def test_bad_stacks_are_refused(layers, message):
    with pytest.raises(ValueError, match=message):
        tiny(layers)


@pytest.mark.parametrize(
    "layers", ["injected,injected", "residual,residual", "injected,residual,injected"]
)
@pytest.mark.parametrize("name", CODEBOOK_FAMILIES)
def test_every_codebook_family_trains_both_kinds(layers, name):
    vae = tiny(layers)
    fam = family(vae, name)
    x = binary(6)
    programs = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    if "residual" in layers and not fam.answers_groups:  # e.g. gumbel: codes from logits
        with pytest.raises(ValueError, match="does not quantise residual code groups"):
            run_traces(*programs, x)
        return
    guide_trace = run_traces(*programs, x)[1]
    for site in vae.code_sites:
        value = site.space.value_of(guide_trace.nodes[site.name]["value"])
        assert value.shape == (6, *site.grid, 2)
    loss = fam.elbo().differentiable_loss(*programs, x)
    loss.backward()
    assert torch.isfinite(loss)
    for index, level in enumerate(vae.levels):  # every level's posterior head and injection learn
        for module in (level.posterior, level.inject):
            grads = [p.grad for p in module.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), (index, module)
            assert any(g.abs().sum() > 0 for g in grads), (index, module)


def test_a_non_codebook_family_is_refused_by_name():
    vae = tiny("residual,residual")
    with pytest.raises(ValueError, match="bernoulli"):
        family(vae, "bernoulli")


def test_a_shared_codebook_is_one_module():
    vae = tiny("injected,residual", shared_codebook=True)
    assert vae.code_sites[0].space is vae.code_sites[1].space
    separate = tiny("injected,residual")
    assert vae.code_sites[0].space is not separate.code_sites[1].space
    count = sum(p.numel() for p in vae.parameters())
    assert count == sum(p.numel() for p in separate.parameters()) - 4 * 2


def trained(layers, steps=200, seed=0):
    """A small stack trained with ``vq`` on the built-in shapes, K = 4 codes per layer (too few for
    one layer to reconstruct them well), and 256 validation images."""
    _, vae, fam, train_x, valid_x = built_run(
        dict(model="hqvae", layers=layers, num_codes=4, code_dim=4, hidden=16, grid=7, train_limit=512),
        "vq",
        seed=seed,
    )
    train(vae, fam, train_x, steps, batch_size=32)
    return vae, fam, valid_x[:256]


def test_a_second_residual_depth_fits_what_the_first_cannot():
    mse = {}
    for layers in ("residual", "residual,residual"):
        vae, fam, x = trained(layers)
        found = evaluate(vae, fam, x)
        mse[layers] = found["reconstruction_mse"]["mean"]
    assert mse["residual,residual"] < 0.8 * mse["residual"], mse
    assert min(v["mean"] for v in found["collapse_score"].values()) > 5, found["collapse_score"]
    with torch.no_grad():  # a second depth whose codes all stand for 0 adds nothing
        vae.code_sites[1].space.weight.zero_()
    scores = evaluate(vae, fam, x)["collapse_score"]
    assert scores["z2"]["mean"] == 0 and scores["z1"]["mean"] > 5, scores


def redrawn_by_hand(vae, fam, x, name, seed=11):
    """Per example, ``log p(x | z) - log p(x | z')`` with ``z'`` the guide's codes but uniform
    indices at site ``name``: the collapse score written out."""
    model, guide = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    site = next(s for s in vae.code_sites if s.name == name)
    vae.eval()
    fam.eval()
    with torch.no_grad(), fam.exact():
        torch.manual_seed(seed)
        model_trace, guide_trace = run_traces(model, guide, x)
        swapped = guide_trace.copy()
        index = torch.randint(site.num_codes, (len(x), *site.grid))
        swapped.nodes[name] = {**guide_trace.nodes[name], "value": site.space.code_of_index(index)}
        replayed = pyro.poutine.trace(pyro.poutine.replay(model, trace=swapped)).get_trace(x)
    log_p = [trace.nodes["x"]["fn"].log_prob(x) for trace in (model_trace, replayed)]
    return (log_p[0] - log_p[1]).double()


def test_collapse_score_is_zero_for_a_disconnected_layer_and_positive_otherwise():
    # Seed 1 leaves both layers well used (scores near 400) at one thread and at two; at seed 0 the
    # first layer ends barely used, and whether its score clears 5 depends on the thread count.
    vae, fam, x = trained("injected,injected", seed=1)
    scores = evaluate(vae, fam, x)["collapse_score"]
    assert scores["z1"]["mean"] > 5 and scores["z2"]["mean"] > 5, scores
    for name in ("z1", "z2"):  # the mean change of log p(x | z) under a uniform redraw
        by_hand = redrawn_by_hand(vae, fam, x, name)
        se = (scores[name]["se"] ** 2 + float(by_hand.var()) / len(x)) ** 0.5
        assert abs(scores[name]["mean"] - float(by_hand.mean())) < 4 * se, (name, scores, by_hand.mean())
    with torch.no_grad():  # z2 no longer reaches the decoder
        vae.levels[1].inject.weight.zero_()
        vae.levels[1].inject.bias.zero_()
    scores = evaluate(vae, fam, x)["collapse_score"]
    assert scores["z2"]["mean"] == 0 and scores["z1"]["mean"] > 5, scores


def test_per_site_families_build_a_stack_and_refuse_split_groups():
    vae = tiny("injected,residual,injected")
    base = RunConfig(model="hqvae", family="sq")
    stack = build_family(RunConfig(model="hqvae", family="sq", site_families="sq,sq,vq"), vae)
    assert isinstance(stack, FamilyStack) and stack.name == "sq+vq"
    assert sorted(stack.families[1].sites) == ["z3"]
    x = binary(6)
    programs = stack.wrap(vae.model, pyro_params=False), stack.wrap(vae.guide, pyro_params=False)
    names = set(run_traces(*programs, x)[1].nodes)
    assert {"g1.deq", "z3.vq"} <= names and "z3.deq" not in names
    assert not isinstance(build_family(base, vae), FamilyStack)
    with pytest.raises(ValueError, match="residual group 'g1'"):
        build_family(RunConfig(model="hqvae", site_families="sq,vq,vq"), vae)
    with pytest.raises(ValueError, match="expected 3 families"):
        build_family(RunConfig(model="hqvae", site_families="sq,vq"), vae)
    with pytest.raises(ValueError, match="'sqq'"):
        build_family(RunConfig(model="hqvae", site_families="sq,sq,sqq"), vae)


def idx_file(path, images):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", *images.shape))
        f.write(images.astype(np.uint8).tobytes())


def test_holdout_keeps_the_last_examples_of_data_without_a_validation_split(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8))
    idx_file(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    data = load_data(RunConfig(data=str(tmp_path), holdout=20))
    assert data.train.shape == (30, 1, 8, 8) and data.valid.shape == (20, 1, 8, 8)
    assert torch.equal(data.valid[:, 0], torch.from_numpy(images[30:]).to(torch.uint8))
    with pytest.raises(ValueError, match="holdout"):
        load_data(RunConfig(data=str(tmp_path), holdout=50))
    with pytest.raises(ValueError, match="holdout"):
        load_data(RunConfig(holdout=10))  # the built-in data has its own split


def test_cli_trains_evaluates_and_samples_a_residual_stack(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--model", "hqvae", "--layers", "residual,residual", "--grid", "7", "--hidden", "16",
              "--num-codes", "8", "--code-dim", "4", "--train-limit", "64"]  # fmt: skip
    assert (
        main(
            [
                "train",
                *common,
                "--family",
                "sq",
                "--max-steps",
                "4",
                "--valid-size",
                "32",
                "--quiet",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", str(run), "--limit", "32", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["collapse_score"]) == set(report["perplexity"]) == {"z1", "z2"}
    assert set(report["dead_codes"]) == {"z1", "z2"} and "g1.deq" in report["rate"]
    assert main(["evaluate", str(run), "--limit", "32", "--quiet", "--no-collapse"]) == 0
    assert "collapse_score" not in json.loads(capsys.readouterr().out)
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "4", "--out", str(out), "--quiet"]) == 0
    assert out.stat().st_size > 0
    capsys.readouterr()
    assert (
        main(["train", "--model", "hqvae", "--layers", "injected,ladder", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "layers: expected a comma-separated list" in capsys.readouterr().err
    assert main(["train", "--layers", "residual", "--out", str(tmp_path / "y")]) == 2
    assert "a setting of the 'hqvae' model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
