"""Peak memory measurement and the rows a memory cap allows."""

from __future__ import annotations

import pytest
import torch

from probvq.inference.diagnostics.memory import MIB, PeakMemory, rows_within


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


def test_rows_within_solves_the_linear_fit_for_the_cap():
    def run(rows):
        return torch.zeros(rows, 256) + 1  # two live (rows, 256) float tensors: 2 KiB per row

    assert rows_within(MIB, run, "cpu") == 512
    with PeakMemory() as peak:
        run(rows_within(3 * MIB, run, "cpu"))
    assert peak.bytes <= 3 * MIB


def test_a_cap_too_small_for_one_row_is_refused():
    with pytest.raises(ValueError, match="too small"):
        rows_within(1000, lambda rows: torch.zeros(rows, 1024), "cpu")
    for cap in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive finite"):
            rows_within(cap, lambda rows: None, "cpu")
