"""tools/quickstart.py --tiny: corpus to comparison table, loss-curve PNG and JSON summary."""

import json
import math
import os
import re
import subprocess
import sys

from tests.data.conftest import REPO


def test_tiny_quickstart_compares_dense_and_lpa(tmp_path):
    output_dir = tmp_path / "quickstart"
    command = [sys.executable, str(REPO / "tools/quickstart.py"), "--tiny", "--output-dir"]
    done = subprocess.run(
        command + [str(output_dir)],
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    header = re.search(
        r"^variant +attn rank +params +tokens/s +val loss +val ppl$", done.stdout, re.MULTILINE
    )
    assert header, done.stdout[-3000:]
    rows = done.stdout[header.end() :].split("\n")[2:4]
    assert [row.split()[0] for row in rows] == ["dense", "lpa"]

    assert (output_dir / "loss_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["dataset"]["documents"] > 1000 and summary["dataset"]["tokens"] > 100_000
    dense, lpa = summary["variants"]["dense"], summary["variants"]["lpa"]
    for result in (dense, lpa):
        assert math.isfinite(result["final_validation_perplexity"])
        assert result["tokens_per_second"] > 0
        # --tiny: 20 steps, each logged, validated every 2.
        assert [step for step, _ in result["train_loss"]] == list(range(1, 21))
        assert [step for step, _ in result["validation_loss"]] == list(range(2, 21, 2))
        assert result["train_loss"][-1][1] < result["train_loss"][0][1]
    # --tiny: 2 layers of width 64; LPA's rank defaults to 64 / 4. Each of Q, K, V and O goes
    # from 64 x 64 weights to 16 x (64 + 64) factors, and nothing else changes.
    assert lpa["lpa_attn_rank"] == 16
    assert dense["parameters"] - lpa["parameters"] == 2 * 4 * (64 * 64 - 16 * (64 + 64))
    # The table shows the summary's figures.
    assert rows[1].split()[1:3] == ["16", f"{lpa['parameters']:,}"]
    assert rows[1].split()[-1] == f"{lpa['final_validation_perplexity']:.2f}"
