"""The combination matrix (``tests/matrix.py``, ``docs/matrix.md``) is complete and true: a row for
every registered family, code space and prior kind; every named test exists; every refusal
happens, before any work; the documented table is the data's."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from matrix import CODEBOOK_ONLY, PRIOR_KINDS, SPACES, cells, markdown

from probvq import AutoregressivePrior, BinaryUnits, Codebook, CodeSite, EnergyPrior
from probvq.inference import FAMILIES
from probvq.priors import Prior

ROOT = Path(__file__).resolve().parent.parent


def test_every_registered_family_space_and_prior_kind_has_a_row():
    table = cells()
    assert {family for family, _, _ in table} == set(FAMILIES)
    assert {space for _, space, _ in table} == set(SPACES)
    assert {kind for _, _, kind in table} == set(PRIOR_KINDS)
    assert len(table) == len(FAMILIES) * len(SPACES) * len(PRIOR_KINDS)
    # logits stand for three kinds (uniform, learned, top-down); a new kind of Prior needs a row
    assert set(typing.get_args(Prior)) == {torch.Tensor, AutoregressivePrior, EnergyPrior}
    for cell in table.values():
        assert cell.get("checks") or "refused" in cell or "gap" in cell, cell


def test_every_named_test_exists():
    named = {test for cell in cells().values() for test in cell.get("checks", [])}
    files = sorted({test.split("::")[0] for test in named})
    found = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *files],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for test in named:
        assert test in found or any(f.startswith(test + "[") for f in found), test


@pytest.mark.parametrize("family", [*CODEBOOK_ONLY, "bernoulli"])
def test_space_refusals_happen_when_the_family_is_built(family):
    for space, kind in (("codebook", Codebook(3, 2)), ("binary", BinaryUnits())):
        cell = cells()[family, space, "uniform"]
        if "refused" not in cell:
            FAMILIES[family].build([CodeSite("z", kind, (2,))])
            continue
        with pytest.raises(ValueError, match=cell["refused"]):
            FAMILIES[family].build([CodeSite("z", kind, (2,))])


def test_the_documented_table_is_the_data():
    text = (ROOT / "docs" / "matrix.md").read_text()
    assert markdown() in text, "docs/matrix.md is stale: regenerate with python tests/matrix.py"
