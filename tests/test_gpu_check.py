"""benchmarks/gpu_check.sh / gpu_check.py (docs/performance.md): the one-line answer without CUDA, the table's
logic on the CPU, and the whole table at tiny sizes (``--device cpu --quick``: the CPU compared with itself)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=900)


def table_rows(stdout: str) -> list[list[str]]:
    """The table's body rows as lists of cells (#, check, setting, result, verdict)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_without_cuda_the_script_prints_one_line_and_exits_0():
    result = run_script(CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert "no CUDA accelerator" in result.stdout


def test_cpu_equality_rows_pass_with_zero_difference(gpu_check):
    rows = gpu_check.equality_rows(torch.device("cpu"), gpu_check.QUICK)
    assert len(rows) == 4
    for row in rows:
        if row.verdict == "skipped":  # diffusers is an optional extra
            assert "diffusers" in row.setting
            continue
        assert row.verdict == "pass", row
        assert all(float(x) == 0.0 for x in re.findall(r"\b(\d\.\de[+-]\d\d)\b", row.result)), row.result


def test_a_failing_section_is_one_fail_row_and_exit_status_1(gpu_check, monkeypatch, capsys):
    def broken(device, scale):
        raise ValueError("shapes (2, 3) and (4, 5) differ")

    monkeypatch.setattr(gpu_check, "SECTIONS", {"1 fine": lambda d, s: [gpu_check.Row("a", "b", "c", "pass")],
                                                "2 broken": broken})
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows == [["1", "a", "b", "c", "pass"],
                    ["2", "broken", "", "error: ValueError: shapes (2, 3) and (4, 5) differ", "FAIL"]]


@pytest.mark.slow
def test_quick_table_on_the_cpu_has_every_row():
    result = run_script("--device", "cpu", "--quick", "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device cpu" in result.stdout.splitlines()[0]
    rows = table_rows(result.stdout)
    by_number: dict[str, list[list[str]]] = {}
    for row in rows:
        by_number.setdefault(row[0], []).append(row)
    assert sorted(by_number) == ["1", "2", "3", "4"]
    assert len(by_number["1"]) == 4 and len(by_number["2"]) == 2 and len(by_number["3"]) == 4
    for _, check, setting, outcome, verdict in rows:
        assert verdict in ("pass", "info") or (verdict == "skipped" and "diffusers" in setting), (check, outcome)
    for _, check, _, outcome, _ in by_number["2"]:
        steps, loss = re.fullmatch(r"([\d.]+) steps/s, final loss (\S+)", outcome).groups()
        assert float(steps) > 0 and math.isfinite(float(loss)), check
    for _, check, _, outcome, _ in by_number["3"]:
        share = float(re.search(r"([\d.]+) %", outcome).group(1))
        assert 0 < share < 100, (check, outcome)
    assert re.search(r": [\d.]+x$", by_number["4"][0][3])
