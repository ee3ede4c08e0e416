"""The README: its commands are the ones CI runs, and every python snippet in it runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return next(line for line in lines if "pytest" in line and not line.startswith("#"))


def test_readme_shows_the_ci_test_command():
    assert _ci_test_command() in README


def test_readme_opens_with_the_demo_command():
    first_block = re.search(r"```(?:bash|sh)\n(.*?)```", README, re.S).group(1)
    assert "fdm demo" in first_block


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", README))))
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch):
    snippet = re.findall(r"```python\n(.*?)```", README, re.S)[index]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})
