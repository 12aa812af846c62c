"""Data encoders run once per point under repeated rows: same log-weights, fewer encoder rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from probvq.inference import FAMILIES, RR, diagnose
from probvq.inference.objectives.importance import log_weights
from probvq.likelihoods import Bernoulli
from probvq.models.vqvae import VQVAE
from probvq.repeats import data_encoders, once_per_point


def small_vqvae(family: str) -> tuple[VQVAE, nn.Module, torch.Tensor]:
    """An 8 x 8 binary-image VQ-VAE (2 x 2 codes) in eval mode, its family and 5 images."""
    vae = VQVAE((1, 8, 8), Bernoulli(), num_codes=8, code_dim=4, grid=2, hidden=8, res_blocks=1)
    fam = FAMILIES[family].build(vae.code_sites)
    vae.eval()
    fam.eval()
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.5))
    with torch.no_grad():  # k-means on the features, so the points' codes differ
        vae.codebook.initialise(vae.encoder(x).movedim(1, -1).reshape(-1, 4))
    return vae, fam, x


class Rows:
    """Counts the calls of a module and the rows each one computed."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda _, args: self.calls.append(len(args[0])))


def weights(vae, fam, x, k, rows, encoders, seed=1):
    model, guide = fam.wrap(vae.model, pyro_params=False), fam.wrap(vae.guide, pyro_params=False)
    torch.manual_seed(seed)
    with torch.no_grad(), fam.exact():
        return torch.cat(list(log_weights(model, guide, x, k, rows, encoders)))


@pytest.mark.parametrize("family", ["vq", "sq", "rr"])
@pytest.mark.parametrize("rows", [4, 13])
def test_log_weights_are_unchanged_by_running_the_encoder_once_per_point(family, rows):
    vae, fam, x = small_vqvae(family)
    every_row = weights(vae, fam, x, 6, rows, ())
    once = weights(vae, fam, x, 6, rows, data_encoders(vae))
    assert once.shape == (5, 6)
    torch.testing.assert_close(once, every_row, rtol=1e-5, atol=1e-4)
    if family != "vq":  # the draws differ: the seed, not a constant weight, makes them agree
        assert not torch.allclose(every_row, weights(vae, fam, x, 6, rows, (), seed=2))


@pytest.mark.parametrize(
    ("rows", "encoder_rows"),
    [(13, [2, 2, 1]), (4, [1] * 10)],  # 2 points per pass; or each point split over 2 passes
)
def test_the_encoder_computes_each_point_once_per_pass(rows, encoder_rows):
    vae, fam, x = small_vqvae("rr")
    encoder, decoder = Rows(vae.encoder[0]), Rows(vae.decoder[0])
    weights(vae, fam, x, 6, rows, data_encoders(vae))
    assert encoder.calls == encoder_rows
    assert sum(decoder.calls) == 5 * 6 and max(decoder.calls) <= rows
    encoder.calls.clear()
    weights(vae, fam, x, 6, rows, ())
    assert sum(encoder.calls) == 5 * 6


def test_diagnose_runs_the_encoder_a_few_times_per_point_not_per_draw():
    vae, fam, x = small_vqvae("sq")
    encoder, decoder = Rows(vae.encoder[0]), Rows(vae.decoder[0])
    found = diagnose(vae, fam, x, k=200, memory_mib=64)
    assert found.rows_per_pass >= 200 and torch.isfinite(found.bound).all()
    assert sum(decoder.calls) > 5 * 200
    # probes (1 + 1 + 4 rows); then once per point each: the reconstructions, the decomposition's
    # exact and surrogate passes, and IWAE (1,000 rows per point without the declaration)
    assert sum(encoder.calls) <= 6 + 4 * 5


def hooks_of(module: nn.Module) -> list[dict]:
    return [
        dict(getattr(module, name))
        for name in (
            "_forward_pre_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
        )
    ]


def test_the_modules_are_restored_after_an_error():
    vae, _, x = small_vqvae("vq")
    seen = []
    vae.encoder.register_forward_hook(lambda _, args, out: seen.append((len(args[0]), len(out))))
    before = hooks_of(vae.encoder)
    expected = vae.encoder(x)
    with pytest.raises(RuntimeError, match="inside"), once_per_point(data_encoders(vae), 3):
        out = vae.encoder(x.repeat_interleave(3, 0))
        torch.testing.assert_close(out, expected.repeat_interleave(3, 0))
        assert seen[-1] == (5, 15)  # other hooks see the whole output
        raise RuntimeError("inside")
    with pytest.raises(ValueError, match="repeated 3 times"), once_per_point([vae.encoder], 3):
        vae.encoder(x)  # 5 rows: not 3 copies of each point
    assert hooks_of(vae.encoder) == before
    seen.clear()
    torch.testing.assert_close(vae.encoder(x), expected)
    assert seen == [(5, 5)]


def test_rows_that_are_not_copies_are_refused_when_validating():
    vae, _, x = small_vqvae("vq")
    shuffled = x.repeat(2, 1, 1, 1)  # 10 rows, but point i is not next to its copy
    checked = once_per_point([vae.encoder], 2, validate=True)
    with pytest.raises(ValueError, match="not 2 consecutive copies"), checked:
        vae.encoder(shuffled)
    with once_per_point([vae.encoder], 2, validate=False):
        assert vae.encoder(shuffled).shape[0] == 10  # unchecked: the caller's promise


def test_training_mode_and_bad_arguments_are_refused():
    vae, _, _ = small_vqvae("vq")
    vae.train()
    with pytest.raises(ValueError, match="training mode"), once_per_point(data_encoders(vae), 2):
        pass
    with pytest.raises(ValueError, match="k: expected"), once_per_point([], 0):
        pass
    with pytest.raises(TypeError, match=r"nn\.Modules"), once_per_point([lambda x: x], 2):
        pass


def test_the_declaration_keeps_the_outermost_modules_once():
    vae, _, _ = small_vqvae("vq")

    class Declares:
        def __init__(self, modules):
            self.modules = modules

        def data_encoders(self):
            return self.modules

    assert data_encoders(vae) == (vae.encoder,)
    assert data_encoders(Declares([vae.encoder[0], vae.encoder, vae.encoder])) == (vae.encoder,)
    assert data_encoders(object()) == ()
    with pytest.raises(TypeError, match=r"nn\.Modules"):
        data_encoders(Declares([vae.encoder, "encoder"]))


def test_a_model_without_declared_encoders_is_diagnosed_as_before(tiny, tiny_data):
    assert data_encoders(tiny) == ()
    rr = RR(tiny.code_sites, init_var=1.0)
    found = [diagnose(tiny, rr, tiny_data, k=50, memory_mib=8, seed=s) for s in range(40)]
    assert found[0].log_weights is None and torch.isfinite(found[0].bound).all()
    # one draw of IWAE_k may exceed log p(x); its mean may not (beyond 4 standard errors)
    bounds = torch.stack([f.bound for f in found])
    excess = bounds.mean(0) - tiny.log_marginal(tiny_data).double().detach()
    assert (excess <= 4 * bounds.std(0) / len(found) ** 0.5).all()
    assert (excess > -0.5).all()  # and it is close: k = 50 draws over 9 codes
