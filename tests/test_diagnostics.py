"""diagnose(): the per-site decomposition, the bounds together, export to netCDF, and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
import xarray as xr
from conftest import CODEBOOK_FAMILIES

from probvq.build import build, load_data, resolve
from probvq.config import RunConfig
from probvq.inference import RR, SQ, FamilyStack, diagnose
from probvq.inference.diagnostics.export import to_inference_data, write_netcdf
from probvq.inference.diagnostics.memory import MIB, PeakMemory
from probvq.inference.diagnostics.plots import write_plots
from probvq.inference.diagnostics.psis import load_arviz

SMALL = dict(num_codes=16, code_dim=8, hidden=16, res_blocks=1, train_limit=200, valid_size=50)


def vqvae(family: str, **overrides):
    config = RunConfig(family=family, quiet=True, **{**SMALL, **overrides})
    dataset = load_data(config)
    pyro.set_rng_seed(0)
    vae, fam = build(resolve(config, dataset), dataset)
    return vae, fam, vae.likelihood.prepare(dataset.valid[:12])


@pytest.fixture(scope="module", params=CODEBOOK_FAMILIES)
def diagnosed(request):
    vae, family, x = vqvae(request.param)
    return request.param, diagnose(vae, family, x, k=64, memory_mib=32, keep_log_weights=True)


def test_site_terms_sum_to_the_exact_elbo(diagnosed):
    _, found = diagnosed
    terms = found.terms
    total = sum(terms.distortion.values()) + sum(terms.rate.values())
    assert torch.allclose(-total, terms.exact, atol=1e-3)
    summary = found.summary()
    means = [s["mean"] for kind in ("distortion", "rate") for s in summary[kind].values()]
    assert -sum(means) == pytest.approx(summary["exact_elbo"]["mean"], abs=1e-3)
    bits = sum(s["bits_per_dim"] for kind in ("distortion", "rate") for s in summary[kind].values())
    assert bits == pytest.approx(summary["exact_bits_per_dim"], rel=1e-5)


def test_every_family_reports_bounds_khat_and_usage(diagnosed):
    name, found = diagnosed
    summary = found.summary()
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN or infinity anywhere
    assert list(summary["iwae_curve"]) == ["1", "10", "64"]
    assert summary["iwae"]["k"] == 64 and summary["pareto_khat"]["points"] == 12
    assert found.log_weights.shape == (12, 64)
    assert torch.allclose(found.bound, torch.logsumexp(found.log_weights, 1) - np.log(64))
    assert summary["num_codes"] == {"z": 16} and 0 < summary["perplexity"]["z"] <= 16
    assert found.terms.usage["z"].sum() == 12 * 7 * 7
    if name == "vq":  # a point mass: the bound is the ELBO and the weights are constant
        assert torch.allclose(found.bound, found.terms.exact.double(), atol=1e-3)
        assert summary["pareto_khat"]["bounded"] == 12
    else:
        assert found.bound.mean() > found.iwae[1].mean()


def test_the_mean_log_weight_estimates_the_code_only_elbo(diagnosed):
    """Its mean agrees with ``code_elbo`` (one exact draw per point) within the noise of both; for
    ``sq`` that is the exact ELBO plus the dequantisation rate, and the exact ELBO itself is
    refused as the mean log-weight's target (the old documentation's claim: a negative control)."""
    name, found = diagnosed
    terms = found.terms
    difference = (found.mean_log_weight - terms.code_elbo.double()).double()
    tolerance = 5 * difference.std() / difference.numel() ** 0.5 + 1e-3
    assert abs(float(difference.mean())) < tolerance, (name, difference.mean(), tolerance)
    if name != "sq":
        assert terms.integrated_out == () and torch.equal(terms.code_elbo, terms.exact)
        return
    assert terms.integrated_out == ("z.deq",)
    torch.testing.assert_close(terms.code_elbo, terms.exact + terms.rate["z.deq"])
    wrong = (found.mean_log_weight - terms.exact.double()).double()
    assert abs(float(wrong.mean())) > 5 * wrong.std() / wrong.numel() ** 0.5
    summary = found.summary()
    assert summary["code_elbo"]["mean"] == pytest.approx(float(terms.code_elbo.double().mean()))
    assert "minus_code_elbo" in summary["iwae"]


def test_a_learned_prior_model_is_diagnosed_like_any_other():
    vae, family, x = vqvae("rr", prior="learned")
    found = diagnose(vae, family, x[:4], k=50)
    total = sum(found.terms.distortion.values()) + sum(found.terms.rate.values())
    assert torch.allclose(-total, found.terms.exact, atol=1e-3)
    assert torch.isfinite(found.bound).all() and torch.isfinite(found.khat).any()


def test_peak_memory_stays_under_the_cap():
    vae, family, x = vqvae("rr")
    rows = {}
    for cap in (4, 16):
        with PeakMemory() as peak:
            rows[cap] = diagnose(vae, family, x[:4], k=100, memory_mib=cap).rows_per_pass
        assert 0.5 * cap * MIB < peak.bytes <= cap * MIB, (cap, peak.bytes / MIB)
    assert rows[4] < 400 < rows[16]  # the small cap splits the 4 x 100 draws over passes


def test_a_user_program_with_stacked_families():
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from two_level_program import TwoLevel

    vae = TwoLevel()
    stack = FamilyStack(SQ(vae.code_sites, claims=["top"]), RR(vae.code_sites, claims=["bottom"]))
    x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.3))
    found = diagnose(vae, stack, x, k=30, memory_mib=64)
    assert set(found.terms.rate) == {"top", "top.deq", "bottom"}
    assert set(found.terms.usage) == {"top", "bottom"}
    assert found.reconstructions[0].shape == (6, 1, 28, 28)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k: expected"),
        ({"memory_mib": 0}, "memory_mib: expected"),
        ({"memory_mib": float("inf")}, "memory_mib: expected"),
        ({"batch_size": 0}, "batch_size: expected"),
        ({"examples": 0}, "examples: expected"),
        ({"x": torch.zeros(0, 1, 28, 28)}, "non-empty"),
        ({"x": torch.full((2, 1, 28, 28), float("nan"))}, "NaN"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    vae, family, x = vqvae("rr")
    with pytest.raises(ValueError, match=match):
        diagnose(vae, family, **{"x": x, **kwargs})


RECORDS = [
    {
        "step": step,
        "epoch": step / 10,
        "loss": 300.0 - step,
        "temperature": None,
        "seconds": 1.5 * step,
        "valid": {
            "exact_elbo": {"mean": -310.0 + step, "se": 2.0},
            "surrogate_elbo": {"mean": -300.0 + step, "se": 2.0},
            "surrogate_gap": {"mean": 10.0, "se": 0.5},
            "rate": {"z": {"mean": 20.0 + step, "se": 0.1}},
            "distortion": {"x": {"mean": 290.0 - step, "se": 1.0}},
            "perplexity": {"z": 5.0 + step},
            "dead_codes": {"z": 3},
        },
    }
    for step in (10, 20)
]


def test_inference_data_round_trips_through_netcdf(diagnosed, tmp_path):
    _, found = diagnosed
    config = {"model": "vqvae", "ema": False, "out": None, "lr": 0.001}
    path = tmp_path / "d.nc"
    write_netcdf(path, to_inference_data(found, RECORDS, config))
    back = load_arviz().from_netcdf(path)
    assert set(back.groups()) == {
        "diagnostics",
        "codebook_usage",
        "training_log",
        "config",
        "log_weights",
    }
    diag = back.diagnostics
    np.testing.assert_array_equal(diag.khat.values, found.khat.numpy())  # -inf and nan survive
    np.testing.assert_allclose(diag.iwae.values, found.bound.numpy())
    np.testing.assert_allclose(diag.rate.sel(latent_site="z").values, found.terms.rate["z"].numpy())
    np.testing.assert_array_equal(diag.iwae_k.values, [1, 10, 64])
    assert json.loads(diag.attrs["summary"]) == json.loads(json.dumps(found.summary()))
    np.testing.assert_array_equal(back.codebook_usage.z.values, found.terms.usage["z"].numpy())
    np.testing.assert_array_equal(back.log_weights.log_weights.values, found.log_weights.numpy())
    log = back.training_log
    np.testing.assert_array_equal(log.step.values, [10, 20])
    np.testing.assert_allclose(log.exact_elbo.values, [-300.0, -290.0])
    np.testing.assert_allclose(log.rate.sel(latent_site="z").values, [30.0, 40.0])
    np.testing.assert_allclose(log.perplexity.sel(code_site="z").values, [15.0, 25.0])
    assert np.isnan(log.temperature.values).all()
    assert json.loads(back.config.json.item()) == config
    assert back.config.attrs["model"] == "vqvae" and back.config.attrs["ema"] == "False"
    with xr.open_dataset(path, group="diagnostics", engine="h5netcdf") as plain:
        assert plain.sizes["point"] == 12


def test_a_failed_write_leaves_the_earlier_file_whole(diagnosed, tmp_path):
    _, found = diagnosed
    path = tmp_path / "d.nc"
    write_netcdf(path, to_inference_data(found))
    before = path.read_bytes()

    class Broken:
        def to_netcdf(self, name):
            Path(name).write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_netcdf(path, Broken())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.nc"]


def test_plots_are_written_as_png(diagnosed, tmp_path):
    _, found = diagnosed
    written = write_plots(found, RECORDS, tmp_path / "plots")
    names = {p.name for p in written}
    assert names == {
        "training_curves.png",
        "rates.png",
        "codebook_usage.png",
        "reconstructions.png",
        "khat.png",
    }
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert "training_curves.png" not in {p.name for p in write_plots(found, [], tmp_path / "again")}


def test_diagnose_is_seeded_and_leaves_the_callers_random_stream_alone():
    vae, family, x = vqvae("sq")
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    first = diagnose(vae, family, x[:3], k=30, seed=4)
    assert torch.equal(torch.rand(1), expected_next)
    again = diagnose(vae, family, x[:3], k=30, seed=4)
    other = diagnose(vae, family, x[:3], k=30, seed=5)
    assert torch.equal(first.bound, again.bound)
    torch.testing.assert_close(first.khat, again.khat, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(first.bound, other.bound)
    assert vae.training and family.training  # modes restored
