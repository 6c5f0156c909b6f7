"""The code is ruff-clean and ruff-formatted (``ruff.toml``: line length 100); fix with
``ruff check --fix . && ruff format .`` from the repository root."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"`ruff {' '.join(command)} .` found problems; run `ruff check --fix . && ruff format .`:\n"
        + result.stdout[-4000:]
        + result.stderr[-2000:]
    )
