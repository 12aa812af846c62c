"""Pyro's own SVI loop, between-step hooks, the family registry and its config sections."""

import json
import re

import pyro
import pytest
import torch
from conftest import CODEBOOK_FAMILIES
from test_binary import BinaryVAE, data
from torch import nn

import probvq
from probvq.build import build, load_data, resolve
from probvq.cli import main, make_parser
from probvq.config import RunConfig
from probvq.inference import FAMILIES, SQ, evaluate, fit
from probvq.inference.families import GuideFamily, Setting, register_family
from probvq.inference.families.relaxed import TemperatureSchedule
from probvq.params import store_name

SMALL = {"hidden": 16, "res_blocks": 0, "num_codes": 16, "code_dim": 4, "train_limit": 512}


def small_run(family: str, **settings):
    config = RunConfig(family=family, family_settings=settings, quiet=True, **SMALL)
    dataset = load_data(config)
    config = resolve(config, dataset)
    vae, guide_family = build(config, dataset)
    prepare = vae.likelihood.prepare
    return vae, guide_family, prepare(dataset.train), prepare(dataset.valid[:200])


def svi_train(vae, family, x, steps, lr=3e-3):
    svi = pyro.infer.SVI(
        family.wrap(vae.model),
        family.wrap(vae.guide),
        pyro.optim.Adam({"lr": lr}),
        family.elbo(max_plate_nesting=1),
    )
    probvq.before_run(steps, vae, family)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (32,), generator=generator)]
        svi.step(batch)
        probvq.after_step(vae, family)
    return svi


@pytest.mark.parametrize("name", CODEBOOK_FAMILIES)
def test_a_plain_pyro_svi_loop_trains_every_family(name):
    vae, family, train_x, valid_x = small_run(name)
    before = evaluate(vae, family, valid_x)["exact_elbo"]["mean"]
    svi_train(vae, family, train_x, 80)
    after = evaluate(vae, family, valid_x)["exact_elbo"]["mean"]
    assert after > before + 5.0, (before, after)
    names = set(pyro.get_param_store().keys())
    assert f"{store_name(vae)}$$$encoder.0.weight" in names
    assert f"{store_name(vae)}$$$z.space.weight" in names


def test_a_plain_pyro_svi_loop_trains_binary_units():
    vae, x = BinaryVAE(), data()
    family = FAMILIES["bernoulli"].build(vae.code_sites)
    before = evaluate(vae, family, x)["exact_elbo"]["mean"]
    svi_train(vae, family, x, 300, lr=1e-2)
    assert evaluate(vae, family, x)["exact_elbo"]["mean"] > before + 1.0


def test_the_param_store_holds_this_modules_own_tensors():
    """An entry left by a collected module whose id was reused is replaced, not handed back."""
    vae, family, train_x, _ = small_run("vq")
    key = f"{store_name(vae)}$$$decoder.0.weight"
    pyro.get_param_store()[key] = torch.zeros(3)  # a stale tensor under this module's name
    svi_train(vae, family, train_x, 1)
    assert pyro.get_param_store()[key] is vae.decoder[0].weight


def test_sq_variances_train_through_svi():
    vae, family, train_x, _ = small_run("sq")
    start = family.log_var["z"].detach().clone()
    svi_train(vae, family, train_x, 20)
    assert not torch.equal(family.log_var["z"].detach(), start)


class Counter(nn.Module):
    """A toy between-step hook: counts steps, remembers the run's length."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.tensor(0))
        self.total = None

    def before_run(self, total_steps):
        self.total = total_steps

    def after_step(self):
        self.steps += 1


def test_fit_runs_every_modules_hooks_after_each_step():
    vae, family, train_x, valid_x = small_run("sq")
    vae.counter = Counter()
    config = RunConfig(max_steps=7, eval_every=7, batch_size=16, valid_size=50, quiet=True)
    fit(vae, family, train_x, valid_x, config)
    assert vae.counter.total == 7 and int(vae.counter.steps) == 7
    assert int(family.steps) == 7  # the family's own hook, once per step as well


def test_a_relative_temperature_schedule_reaches_its_floor_at_its_fraction_of_the_run():
    vae, family, train_x, valid_x = small_run("sq", temperature=1.0, temperature_min=0.25)
    config = RunConfig(max_steps=20, eval_every=10, batch_size=16, valid_size=50, quiet=True)
    history = fit(vae, family, train_x, valid_x, config).history
    fraction = family.schedule.fraction
    assert history[0]["temperature"] == pytest.approx(1.0 * 0.25 ** (10 / (fraction * 20)))
    assert history[1]["temperature"] == pytest.approx(0.25)


def test_a_relative_schedule_without_a_run_length_is_refused_when_it_steps():
    family = SQ(small_run("sq")[0].code_sites)
    assert family.temperature == 1.0  # step 0: nothing to decay yet
    with pytest.raises(ValueError, match="before_run"):
        family.after_step()
    assert TemperatureSchedule(rate=0.1, fraction=None)(10) == pytest.approx(max(torch.e**-1, 0.5))


def test_train_help_lists_the_registered_families_and_their_settings():
    text = make_parser()._subparsers._group_actions[0].choices["train"].format_help()
    flowing = " ".join(text.split()).replace("- ", "-")  # argparse may wrap lines after a hyphen
    for name, spec in FAMILIES.items():
        assert f"{name}: {spec.summary}" in flowing
    for flag in ("--beta", "--temperature", "--init-var", "--straight-through", "--anneal-fraction"):
        assert flag in text


def test_a_family_registered_anywhere_is_offered_by_the_cli():
    @register_family("toy", "a test family", scale=Setting("a number"))
    class Toy(GuideFamily):
        name = "toy"

        def __init__(self, sites, scale: float = 2.0, claims=None):
            super().__init__(sites, claims)
            self.scale = scale

    try:
        text = " ".join(
            make_parser()._subparsers._group_actions[0].choices["train"].format_help().split()
        )
        assert "toy: a test family" in text and "--scale" in text and "toy 2.0" in text
        spec = FAMILIES["toy"]
        assert spec.resolve({"scale": 3}) == {"scale": 3.0}
        with pytest.raises(ValueError, match="scale: expected float"):
            spec.resolve({"scale": "big"})
        with pytest.raises(ValueError, match=r"\['colour'\] are not settings of family 'toy'"):
            spec.resolve({"colour": 1})
    finally:
        del FAMILIES["toy"]


def test_a_registration_must_match_its_constructor():
    with pytest.raises(TypeError, match="not a keyword argument"):

        @register_family("broken", "no such argument", missing=Setting("nothing"))
        class Broken(GuideFamily):
            pass

    assert "broken" not in FAMILIES


TINY = ["--max-steps", "2", "--eval-every", "2", "--hidden", "8", "--res-blocks", "0"]
TINY += ["--train-limit", "64", "--valid-size", "32", "--quiet"]


def test_family_settings_live_in_a_section_named_after_the_family(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('family = "sq"\n[sq]\ntemperature = 0.7\ninit_var = 2.0\n')
    out = tmp_path / "out"
    args = ["train", "--config", str(tmp_path / "run.toml"), "--out", str(out), *TINY]
    assert main([*args, "--init-var", "0.5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "sq" and "vq" not in config
    assert config["sq"]["temperature"] == 0.7 and config["sq"]["init_var"] == 0.5
    assert config["sq"]["straight_through"] == FAMILIES["sq"].settings["straight_through"].default
    assert RunConfig.from_dict(config).family_settings == config["sq"]


@pytest.mark.parametrize(
    ("args", "toml", "match"),
    [
        (
            ["--family", "rr", "--beta", "0.5"],
            "",
            "--beta: a setting of vq, not of the chosen family 'rr'",
        ),
        ([], 'family = "rr"\n[vq]\nbeta = 0.5\n', r"unknown settings \['vq'\]"),
        ([], 'family = "sq"\n[sq]\ncolour = 1\n', r"\['colour'\] are not settings of family 'sq'"),
        ([], 'family = "sq"\n[sq]\ntemperature = "hot"\n', "temperature: expected float"),
        (
            ["--family", "sq", "--temperature", "0.5", "--temperature-min", "2.0"],
            "",
            "temperature minimum",
        ),
        (["--family", "gumbel-ish"], "", "family: expected one of"),
    ],
)
def test_family_settings_are_checked_before_any_work(tmp_path, capsys, args, toml, match):
    config = tmp_path / "run.toml"
    config.write_text(toml)
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out", str(out), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(match, err), err
    assert not out.exists()
