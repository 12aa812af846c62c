import pytest
import torch

from probvq import Codebook, perplexity


def direct_distances(z, weight):
    return (z[..., None, :] - weight).pow(2).sum(-1)


def test_chunked_distances_equal_direct_and_have_the_same_gradient():
    book = Codebook(37, 5, init="normal", chunk_elements=64)  # many chunks of a few codes
    z = torch.randn(4, 6, 5, requires_grad=True)
    chunked = book.distances(z)
    direct = direct_distances(z, book.weight)
    assert chunked.shape == (4, 6, 37)
    torch.testing.assert_close(chunked, direct, rtol=1e-5, atol=1e-4)
    g1 = torch.autograd.grad(chunked.sin().sum(), (z, book.weight))
    g2 = torch.autograd.grad(direct.sin().sum(), (z, book.weight))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_nearest_is_the_argmin_across_chunk_boundaries():
    book = Codebook(1000, 8, init="normal", chunk_elements=3000)
    z = torch.randn(300, 8)
    assert torch.equal(book.nearest(z), direct_distances(z, book.weight).argmin(-1))
    exact = book.weight[[3, 999, 500]]
    assert book.nearest(exact).tolist() == [3, 999, 500]


def test_nearest_on_a_large_codebook_matches_brute_force():
    book = Codebook(65_536, 64, init="normal")
    z = torch.randn(2048, 64)
    index = book.nearest(z)
    probe = torch.arange(0, 2048, 97)
    brute = direct_distances(z[probe], book.weight).argmin(-1)
    assert torch.equal(index[probe], brute)


@pytest.mark.slow
def test_the_issue_size_runs_chunked():
    book = Codebook(65_536, 64, init="normal")
    index = book.nearest(torch.randn(16_384, 64))
    assert index.shape == (16_384,) and int(index.max()) < 65_536


def test_kmeans_init_quantises_better_than_random_data_rows():
    centres = torch.randn(8, 3) * 5
    features = (centres[torch.randint(8, (2000,))] + 0.1 * torch.randn(2000, 3)).view(40, 50, 3)
    errors = {}
    for init in ("data", "kmeans"):
        torch.manual_seed(1)
        book = Codebook(8, 3, init=init)
        assert not book.initialised
        book.initialise(features)
        assert book.initialised
        flat = features.reshape(-1, 3)
        errors[init] = (flat - book.weight[book.nearest(flat)]).pow(2).sum(-1).mean()
    assert errors["kmeans"] < errors["data"]
    assert errors["kmeans"] < 0.1  # near the noise floor of 3 * 0.01


def test_ema_update_follows_laplace_smoothed_cluster_means():
    book = Codebook(3, 2, init="normal")
    before = book.weight.detach().clone()
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    index = torch.tensor([0, 0, 2])
    book.observe(features, index)
    book.commit(ema_decay=0.9, epsilon=1e-5)
    counts = torch.tensor([2.0, 0.0, 1.0])
    sums = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 5.0]])
    n = 0.9 * torch.ones(3) + 0.1 * counts
    m = 0.9 * before + 0.1 * sums
    smoothed = (n + 1e-5) / (n.sum() + 3e-5) * n.sum()
    torch.testing.assert_close(book.weight.detach(), m / smoothed[:, None])
    # the unused code keeps its place instead of collapsing to the origin
    torch.testing.assert_close(book.weight.detach()[1], before[1], rtol=1e-3, atol=1e-3)


def test_dead_codes_restart_on_encoder_outputs():
    book = Codebook(4, 2, init="normal", restart_threshold=0.5, usage_decay=0.5)
    features = torch.tensor([[10.0, 10.0]]).repeat(6, 1)
    book.observe(features, torch.zeros(6, dtype=torch.long))
    book.commit()
    # codes 1..3 got no data: usage 0.5 * 1 < 0.5 fails, so they decay below on the next step
    book.observe(features, torch.zeros(6, dtype=torch.long))
    book.commit()
    moved = book.weight.detach()[1:]
    torch.testing.assert_close(moved, torch.full((3, 2), 10.0))


def test_commit_without_observations_changes_nothing():
    book = Codebook(4, 2, init="normal", restart_threshold=10.0)
    before = book.weight.detach().clone()
    book.commit(ema_decay=0.9)
    assert torch.equal(book.weight.detach(), before)


def test_perplexity_counts_effective_codes():
    assert perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])) == pytest.approx(4.0)
    assert perplexity(torch.tensor([7.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert perplexity(torch.zeros(3)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_codes": 1, "dim": 2}, "K >= 2"),
        ({"num_codes": 4, "dim": 0}, "dim"),
        ({"num_codes": 4, "dim": 2, "init": "zeros"}, "init"),
        ({"num_codes": 4, "dim": 2, "restart_threshold": -1}, "restart_threshold"),
    ],
)
def test_bad_codebook_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Codebook(**kwargs)


def test_wrong_feature_dimension_is_refused():
    with pytest.raises(ValueError, match="D=3"):
        Codebook(4, 3).distances(torch.randn(2, 4))
    with pytest.raises(ValueError, match="empty"):
        Codebook(4, 3, init="data").initialise(torch.randn(0, 3))
