"""bfloat16 autocast keeps what must stay exact in float32, and trains as float32 does; compiling
the networks changes nothing but speed."""

import pytest
import torch
from conftest import CODEBOOK_FAMILIES, built_run
from pyro import poutine

from probvq.codebook import Codebook
from probvq.inference import evaluate, fit

SMALL = dict(
    num_codes=16, code_dim=8, hidden=16, res_blocks=1, batch_size=32, train_limit=640, valid_size=100,
    quiet=True,
)  # fmt: skip


def setup(family="sq", **overrides):
    config, vae, fam, train_x, valid_x = built_run(SMALL, family, **overrides)
    return config, vae, fam, train_x, valid_x[:100]


def test_distances_and_nearest_codes_ignore_autocast():
    torch.manual_seed(0)
    book = Codebook(300, 8, init="normal")
    z = torch.randn(64, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distances, nearest = book.distances(z), book.nearest(z)
    assert distances.dtype == torch.float32
    torch.testing.assert_close(distances, book.distances(z))
    assert torch.equal(nearest, book.nearest(z))


@pytest.mark.parametrize("family", CODEBOOK_FAMILIES)
def test_codes_beyond_bfloat16s_exact_integers_survive_autocast(family):
    # bfloat16 holds integers exactly only up to 256: K = 300 codes must keep a float32 index channel
    _, vae, fam, train_x, _ = setup(family, num_codes=300)
    fam.train()
    guide = fam.wrap(vae.guide, pyro_params=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trace = poutine.trace(guide).get_trace(train_x[:32])
    code = trace.nodes["z"]["value"]
    assert code.dtype == torch.float32
    index = vae.z.space.index_of(code)
    assert index.max() < 300 and torch.equal(index.float(), code[..., -1])


@pytest.mark.parametrize("family", CODEBOOK_FAMILIES)
def test_bf16_training_tracks_float32(family):
    results = {}
    for precision in ("fp32", "bf16"):
        config, vae, fam, train_x, valid_x = setup(family, max_steps=20, precision=precision)
        fit(vae, fam, train_x, valid_x, config)
        results[precision] = evaluate(vae, fam, valid_x)["exact_elbo"]["mean"]
    assert results["bf16"] == pytest.approx(results["fp32"], rel=0.01), results


@pytest.mark.slow
def test_compiled_networks_compute_and_train_like_eager_ones():
    elbos = []
    for compile_ in (False, True):
        config, vae, fam, train_x, valid_x = setup("vq", max_steps=4, eval_every=4, compile=compile_)
        if compile_:
            for net in (vae.encoder, vae.decoder):
                net.compile()
        before = evaluate(vae, fam, valid_x)["exact_elbo"]["mean"]
        fit(vae, fam, train_x, valid_x, config)
        elbos.append((before, evaluate(vae, fam, valid_x)["exact_elbo"]["mean"]))
    assert elbos[1][0] == pytest.approx(elbos[0][0], rel=1e-5)  # same function
    assert elbos[1][1] == pytest.approx(elbos[0][1], rel=1e-2)  # Adam amplifies rounding a little
