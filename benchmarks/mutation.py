"""Mutation testing of the math modules: how many small breaks of the math the tests catch.

mutmut (the ``mutation`` extra) rewrites each function of the modules below into variants that differ
by one small change (an operator, a constant, an argument dropped), runs the tests that call that
function against each variant, and counts a variant *killed* when some test fails. A *surviving*
variant is a change to the math that no test notices: either a test is missing, or the change is
equivalent (it cannot alter any result), which ``benchmarks/mutation_triage.json`` records with a
reason.

mutmut expects a package to sit in one folder, while probvq's ``models/`` and ``inference/`` are
top-level folders installed as ``probvq.models`` and ``probvq.inference``. So the run happens in a
workspace (``runs/mutation/`` by default) that joins them under ``probvq/``, with a ``pyproject.toml``
holding mutmut's configuration: the modules to mutate and the test files to run. Usage::

    pip install -e ".[mutation]"
    python benchmarks/mutation.py [--only probvq/rates.py ...] [--max-children 2]

It writes the score per module and every surviving mutant (its diff, and the triage reason where it
has one) to ``benchmarks/results/mutation.json``. The default run takes hours on two cores; ``--only``
restricts it to some modules, and ``--resume`` keeps the results already in the workspace.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from common import write_result

ROOT = Path(__file__).resolve().parent.parent

# The math of the library (issue 18): code distributions, rates, codebook, priors, likelihoods, the RBM
# machinery, every family and every objective. Paths as they are in the repository.
MATH_MODULES = [
    "probvq/codes.py",
    "probvq/rates.py",
    "probvq/codebook.py",
    "probvq/priors.py",
    "probvq/likelihoods.py",
    "probvq/rbm.py",
    *sorted(
        str(p.relative_to(ROOT))
        for folder in ("inference/families", "inference/objectives")
        for p in (ROOT / folder).glob("*.py")
        if p.name != "__init__.py"
    ),
]

# The tests of that math. The application's tests (CLI, resume, faults, data, diagnostics' files) are
# left out: they call the same functions through subprocesses and long trainings, so they would cost
# hours here without checking the math more closely.
MATH_TESTS = [
    "tests/test_bad_input.py",
    "tests/test_binary.py",
    "tests/test_codebook.py",
    "tests/test_codes.py",
    "tests/test_deep.py",
    "tests/test_enum.py",
    "tests/test_exact_bounds.py",
    "tests/test_groups.py",
    "tests/test_gumbel.py",
    "tests/test_hqvae.py",
    "tests/test_importance.py",
    "tests/test_interop.py",
    "tests/test_likelihoods.py",
    "tests/test_pixelcnn.py",
    "tests/test_precision.py",
    "tests/test_prior_stage.py",
    "tests/test_protocol.py",
    "tests/test_rates.py",
    "tests/test_rbm.py",
    "tests/test_score.py",
    "tests/test_stability.py",
]

# Exit codes as mutmut records them (mutmut/__main__.py, status_by_exit_code).
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout", -11: "segfault", None: "not checked"}  # fmt: skip
DETECTED = {"killed", "timeout", "segfault"}


def workspace_path(repo_path: str) -> str:
    """Where a repository file sits in the workspace, where every package lives under ``probvq/``."""
    for top in ("models/", "inference/"):
        if repo_path.startswith(top):
            return "probvq/" + repo_path
    return repo_path


def _undecorated(body: list, module: cst.Module) -> list:
    """``@d def f`` as ``def f`` then ``f = d(f)``, for top-level and class-level definitions: the same
    program, which mutmut mutates (it skips every decorated definition, so whole families and the
    registered KLs would go untested). ``@staticmethod`` stays: mutmut's trampoline passes ``self``."""
    out = []
    for stmt in body:
        if isinstance(stmt, cst.ClassDef) and isinstance(stmt.body, cst.IndentedBlock):
            inner = _undecorated(list(stmt.body.body), module)
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner))
        decorators = [module.code_for_node(d.decorator) for d in getattr(stmt, "decorators", ())]
        if not decorators or "staticmethod" in decorators:
            out.append(stmt)
            continue
        applied = stmt.name.value
        for decorator in reversed(decorators):
            applied = f"{decorator}({applied})"
        assignment = cst.parse_statement(f"{stmt.name.value} = {applied}\n")
        out += [stmt.with_changes(decorators=[]), assignment]
    return out


def prepare_for_mutation(source: str) -> str:
    """The module mutmut sees: decorators applied by assignment, and every line of a ``raise`` marked
    ``no mutate``. Error messages are the bad-input tests' subject (they match the text); mutating
    their wording here would only count typos. The guards that decide whether to raise stay mutated."""
    module = cst.parse_module(source)
    code = module.with_changes(body=_undecorated(list(module.body), module)).code
    positions = MetadataWrapper(cst.parse_module(code)).resolve(PositionProvider)
    raising = {line for node, span in positions.items() if isinstance(node, cst.Raise)
               for line in range(span.start.line, span.end.line + 1)}  # fmt: skip
    lines = code.splitlines()
    for line in sorted(raising):
        lines[line - 1] += "  # pragma: no mutate"
    marked = "\n".join(lines) + "\n"
    if ast.dump(ast.parse(marked)) != ast.dump(ast.parse(code)):  # a comment landed inside a string
        raise RuntimeError("marking raise statements changed the program")
    return marked


def build_workspace(ws: Path, modules: list[str], tests: list[str]) -> None:
    if ws.exists():
        shutil.rmtree(ws)
    shutil.copytree(ROOT / "probvq", ws / "probvq", ignore=shutil.ignore_patterns("__pycache__"))
    for top in ("models", "inference"):
        shutil.copytree(ROOT / top, ws / "probvq" / top, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", ws / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    mutated = {workspace_path(m) for m in modules}
    for path in mutated:
        (ws / path).write_text(prepare_for_mutation((ws / path).read_text()))
    every = sorted(str(p.relative_to(ws)) for p in (ws / "probvq").rglob("*.py"))
    untouched = [p for p in every if p not in mutated]
    config = "\n".join([
        "[tool.mutmut]",
        'paths_to_mutate = ["probvq"]',
        f"do_not_mutate = {json.dumps(untouched)}",
        f"tests_dir = {json.dumps(tests)}",
        "",
        "[tool.pytest.ini_options]",
        'addopts = "-m \'not slow\' -p no:cacheprovider"',
        'markers = ["slow: long-running checks"]',
        "",
    ])  # fmt: skip
    (ws / "pyproject.toml").write_text(config)


def run_mutmut(ws: Path, max_children: int) -> None:
    # One thread per test process: the children run side by side, and OpenMP pools do not survive fork.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    # Through ``cli`` rather than ``-m mutmut``: the trampolines import ``mutmut.__main__``, which must
    # not be a second copy of the running module. mutmut's check that the trampolines are live (every
    # call raises, so the tests must fail) expects failing tests; here the conftest's module-level
    # calls already fail, which pytest reports as a usage error (exit 4): that is the same proof.
    launch = "\n".join(
        [
            "import sys, mutmut.__main__ as m",
            "class Runner(m.PytestRunner):",
            "    def run_forced_fail(self):",
            "        try:",
            "            return super().run_forced_fail()",
            "        except m.BadTestExecutionCommandsException:",
            "            return 4",
            "m.PytestRunner = Runner",
            "sys.argv[0] = 'mutmut'",
            "m.cli()",
        ]
    )
    with open(ws / "mutmut.log", "a") as log:
        subprocess.run([sys.executable, "-c", launch, "run", "--max-children", str(max_children)],
                       cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip


def diff_of(mutants: cst.Module, name: str, path: str) -> str:
    """The mutant's function against the original, as ``mutmut show`` prints it."""
    from mutmut.__main__ import read_mutant_function, read_original_function

    original = cst.Module([read_original_function(mutants, name)]).code.strip().splitlines()
    mutated = cst.Module([read_mutant_function(mutants, name)]).code.strip().splitlines()
    return "\n".join(difflib.unified_diff(original, mutated, fromfile=path, tofile=path, lineterm=""))


def triage_key(name: str, diff: str) -> str:
    """The function and the changed lines: they name a mutant in the triage file, where mutmut's
    numbers change whenever the function does. A key of the function alone covers all its mutants."""
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return "\n".join([name.rsplit("__mutmut_", 1)[0], *changed])


def collect(ws: Path, modules: list[str], triage: dict[str, str]) -> dict[str, Any]:
    per_module: dict[str, Counter] = {}
    survivors = []
    for module in modules:
        meta = ws / "mutants" / (workspace_path(module) + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(STATUS.get(code, f"exit {code}") for code in codes.values())
        source = cst.parse_module((ws / "mutants" / workspace_path(module)).read_text())
        for name, code in sorted(codes.items()):
            if STATUS.get(code) in DETECTED | {"not checked"}:
                continue
            diff = diff_of(source, name, module)
            key = triage_key(name, diff)
            reason = triage.get(key) or triage.get(key.split("\n", 1)[0])
            counts["equivalent" if reason else "undetected"] += 1
            survivors.append({"module": module, "name": name, "status": STATUS.get(code, str(code)),
                              "equivalent": reason, "diff": diff})  # fmt: skip
        per_module[module] = counts
    rows = {}
    for module, c in per_module.items():
        total = sum(c[s] for s in set(STATUS.values()) if s != "not checked")
        detected = sum(c[s] for s in DETECTED)
        rows[module] = {"mutants": total, "killed": detected, "equivalent": c["equivalent"],
                        "undetected": c["undetected"], "no_tests": c["no tests"],
                        "not_checked": c["not checked"],
                        "score": detected / max(total - c["equivalent"], 1)}  # fmt: skip
    mutants = sum(r["mutants"] for r in rows.values())
    equivalent = sum(r["equivalent"] for r in rows.values())
    killed = sum(r["killed"] for r in rows.values())
    return {
        "score": killed / max(mutants - equivalent, 1),
        "mutants": mutants,
        "killed": killed,
        "equivalent": equivalent,
        "not_checked": sum(r["not_checked"] for r in rows.values()),
        "modules": rows,
        "survivors": survivors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        nargs="+",
        default=MATH_MODULES,
        metavar="MODULE",
        help="repository paths of the modules to mutate (default: all math modules)",
    )
    parser.add_argument("--tests", nargs="+", default=MATH_TESTS, metavar="FILE")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--workspace", type=Path, default=ROOT / "runs" / "mutation")
    parser.add_argument("--resume", action="store_true", help="keep the workspace's results so far")
    parser.add_argument("--report-only", action="store_true", help="collect the workspace's results")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation.json")
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(MATH_MODULES))
    if unknown:
        raise ValueError(f"--only: {unknown} are not math modules; expected some of {MATH_MODULES}")
    missing = [t for t in args.tests if not (ROOT / t).is_file()]
    if missing:
        raise FileNotFoundError(f"--tests: no such test files {missing}")
    if not args.report_only:
        if not args.resume:
            build_workspace(args.workspace, args.only, args.tests)
        run_mutmut(args.workspace, args.max_children)
    triage = json.loads((ROOT / "benchmarks" / "mutation_triage.json").read_text())
    result = collect(args.workspace, args.only, triage)
    result["tests"] = args.tests
    write_result(args.out, result)
    for module, row in [*result["modules"].items(), ("all", result)]:
        counted = row["mutants"] - row["equivalent"]
        print(f"{module:42s} {row['killed']:5d}/{counted:<5d} {row['score']:.1%}  "
              f"({row['equivalent']} equivalent, {row['not_checked']} not checked)")  # fmt: skip


if __name__ == "__main__":
    main()
