"""The code stays ruff-clean (rules in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


RUFF = shutil.which("ruff") or str(ROOT / ".venv/bin/ruff")


@pytest.mark.skipif(not Path(RUFF).exists(), reason="ruff not installed")
def test_ruff_clean():
    ruff = RUFF
    proc = subprocess.run([ruff, "check", "mmoe_fast", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
