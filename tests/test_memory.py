"""Peak memory measurement and the rows a memory cap allows."""

from __future__ import annotations

import pytest
import torch

from probvq.inference.diagnostics.memory import MIB, PeakMemory, row_cost


def test_peak_counts_live_tensors_not_freed_ones():
    with PeakMemory() as peak:
        kept = torch.ones(1_000_000)  # 4 MB, alive at the end
        for _ in range(10):
            (torch.ones(500_000) * 2).sum()  # 2 MB + 2 MB, freed each time
    assert kept.numel() and 8e6 <= peak.bytes <= 9e6


def test_views_share_their_storage():
    with PeakMemory() as peak:
        base = torch.zeros(250_000)
        views = [base[i:] for i in range(5)]
    assert views and peak.bytes == 1_000_000


def test_views_of_storage_made_before_the_block_cost_nothing():
    weight = torch.nn.Linear(1000, 1000).weight
    with torch.no_grad(), PeakMemory() as peak:
        flat = weight.view(-1)
        transposed = weight.t()
        weight.mul_(1.0)
    assert flat.numel() and transposed.numel() and peak.bytes == 0


def test_row_cost_solves_the_linear_fit_for_the_cap():
    def run(points, draws):
        return torch.zeros(points * draws, 256) + 1  # two live (rows, 256) float tensors: 2 KiB a row

    cost = row_cost(run, "cpu")
    assert (cost.fixed, cost.per_row, cost.per_point) == (0, 2048, 0)
    assert cost.rows_within(MIB, 1) == cost.rows_within(MIB, 100) == 512
    with PeakMemory() as peak:
        run(1, cost.rows_within(3 * MIB, 1))
    assert peak.bytes <= 3 * MIB


@pytest.mark.parametrize("k", [1, 7, 100, 5000])
def test_per_point_memory_is_fitted_and_the_cap_holds_for_every_k(k):
    def run(points, draws):  # 4 KiB per point (an encoder's work), 1 KiB per row
        return torch.empty(points, 1024), torch.empty(points * draws, 256)

    cost = row_cost(run, "cpu")
    assert (cost.fixed, cost.per_row, cost.per_point) == (0, 1024, 4096)
    rows = cost.rows_within(MIB, k)
    points = max(1, rows // k)  # the passes of importance.log_weights
    with PeakMemory() as peak:
        run(points, min(k, rows // points))
    assert peak.bytes <= MIB
    assert rows == {1: 204, 7: 649, 100: 980, 5000: 1019}[k]  # (cap - 4096) // (1024 + 4096 / k)


def test_a_cap_too_small_for_one_row_is_refused():
    cost = row_cost(lambda points, draws: torch.zeros(points * draws, 1024), "cpu")
    with pytest.raises(ValueError, match="too small"):
        cost.rows_within(1000, 1)
    for cap in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive finite"):
            cost.rows_within(cap, 1)
