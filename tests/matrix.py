"""The combination matrix of issue 18, family x code space x prior kind, as data.

Each cell names the tests that check it against ground truth (pytest ids), the refusal that stops
it before any work, or an honest ``gap``. ``tests/test_matrix.py`` fails when a registered family,
a code space or a prior kind has no row, when a named test does not exist, or when a refusal does
not happen; ``python tests/matrix.py`` prints the table that ``docs/matrix.md`` holds.
"""

from __future__ import annotations

SPACES = ("codebook", "binary")
PRIOR_KINDS = ("uniform", "learned", "top-down", "autoregressive", "energy")
MODES = ("exact", "straight-through", "soft")
CODEBOOK_ONLY = ("vq", "sq", "rr", "gumbel")

_RATES = "tests/test_rates.py::"
_CASE = {"uniform": "uniform", "learned": "logits", "autoregressive": "markov", "energy": "energy"}


def _rates(family: str, kind: str, binary: bool) -> list[str]:
    """test_rates ids that check one cell's rate and gradients (exact, straight-through, soft)."""
    case = f"{family}-{_CASE[kind]}-{binary}"
    if family == "vq":
        if kind == "uniform":
            return [_RATES + "test_hard_vq_pays_log_k_per_position_under_a_uniform_prior"]
        return [_RATES + f"test_hard_vq_pays_the_rate_of_its_codes[{_CASE[kind]}]"]
    found = [_RATES + f"test_exact_codes_pay_the_enumerated_kl[{case}]"]
    if family != "score":
        found.append(_RATES + f"test_straight_through_values_pay_the_enumerated_kl[{case}]")
        if not (kind == "energy" and not binary):
            soft = "test_soft_relaxation_pays_the_relaxed_objective_with_its_gradients"
            found.append(_RATES + f"{soft}[{case}]")
    return found


TOP_DOWN = [
    "tests/test_deep.py::test_per_layer_rates_sum_to_the_exact_joint_kl",
    "tests/test_deep.py::test_per_layer_kl_equals_monte_carlo",
]
TOP_DOWN_GAP = "gap: values only; no gradient through a relaxed parent against ground truth yet"


def cells() -> dict[tuple[str, str, str], dict]:
    """``(family, space, prior kind) -> {"checks": [...], "refused": regex, "gap": text}``."""
    table: dict[tuple[str, str, str], dict] = {}
    for family in (*CODEBOOK_ONLY, "score", "bernoulli", "enum"):
        for space in SPACES:
            for kind in PRIOR_KINDS:
                table[family, space, kind] = _cell(family, space, kind)
    return table


def _cell(family: str, space: str, kind: str) -> dict:
    binary = space == "binary"
    if family in CODEBOOK_ONLY and binary:
        return {"refused": f"the '{family}' family infers Codebook sites"}
    if family == "bernoulli" and not binary:
        return {"refused": "the 'bernoulli' family infers BinaryUnits sites"}
    if family == "rr" and kind in ("autoregressive", "energy"):
        return {
            "refused": "'rr' family mixes with per-position prior probabilities",
            "checks": [_RATES + f"test_rr_refuses_priors_it_cannot_mix_with[{_CASE[kind]}]"],
        }
    if family == "enum":
        if kind == "learned" and not binary:
            return {"checks": [
                "tests/test_enum.py::test_the_loss_is_minus_log_p_x_and_its_gradient_the_exact_one",
                "tests/test_enum.py::test_fit_trains_a_mixture_whose_posterior_weights_underflow",
            ]}  # fmt: skip
        return {"gap": "runs; the objective is log p(x) by enumeration, checked on learned logits only"}
    if kind == "top-down":
        return {"checks": TOP_DOWN if family == "rr" else [], "gap": TOP_DOWN_GAP}
    checks = _rates(family, kind, binary)
    if family == "score" and kind == "learned" and not binary:  # the score-function gradients
        checks.append(
            "tests/test_score.py::test_score_gradients_are_unbiased_against_the_enumerated_gradient"
        )
    return {"checks": checks}


def markdown() -> str:
    rows = ["| family | space | prior kind | status | checked by |", "|---|---|---|---|---|"]
    for (family, space, kind), cell in cells().items():
        if "refused" in cell:
            status = f'refused: "{cell["refused"]}"'
        else:
            status = cell.get("gap", "checked against ground truth")
        tests = "<br>".join(f"`{t.split('::')[1]}`" for t in cell.get("checks", [])) or "-"
        rows.append(f"| {family} | {space} | {kind} | {status} | {tests} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
