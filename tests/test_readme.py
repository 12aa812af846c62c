"""The README's Python blocks run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_gives_exactly_two_setup_commands():
    section = README.read_text().split("<!-- setup -->")[1]
    commands = [line for line in section.splitlines() if line.startswith(("pip", "python"))]
    assert commands == ['pip install -e ".[dev]"', "python -m pytest -q"]
