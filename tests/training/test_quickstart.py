"""tools/quickstart.py --tiny: corpus to comparison table on held-out documents, loss-curve PNG,
JSON summary, and checkpoints that the README's commands evaluate, sample from, export both ways
(loaded by transformers) and import back."""

import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.data.conftest import REPO

_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart's output directory and its console output."""
    output_dir = tmp_path_factory.mktemp("runs") / "quickstart"
    command = [sys.executable, str(REPO / "tools/quickstart.py"), "--tiny", "--output-dir"]
    done = subprocess.run(
        command + [str(output_dir)], env=_ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output_dir, done


def test_tiny_quickstart_compares_dense_and_lpa(quickstart):
    output_dir, done = quickstart
    header = re.search(
        r"^variant +attn rank +params +loss +ppl +bits/byte$", done.stdout, re.MULTILINE
    )
    assert header, done.stdout[-3000:]
    rows = done.stdout[header.end() :].split("\n")[2:4]
    assert [row.split()[0] for row in rows] == ["dense", "lpa"]
    assert "tokens/s" not in done.stdout and "TFLOP/s" not in done.stdout

    assert (output_dir / "loss_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["dataset"]["documents"] > 1000 and summary["dataset"]["tokens"] > 100_000
    dense, lpa = summary["variants"]["dense"], summary["variants"]["lpa"]
    for variant, result in (("dense", dense), ("lpa", lpa)):
        # --tiny: 20 steps, each logged, validated every 2.
        assert [step for step, _ in result["train_loss"]] == list(range(1, 21))
        assert [step for step, _ in result["validation_loss"]] == list(range(2, 21, 2))
        assert result["train_loss"][-1][1] < result["train_loss"][0][1]
        # The table's figures are the final checkpoint's over every held-out token once.
        held_out = result["held_out"]
        assert held_out["tokens"] == summary["held_out"]["tokens"] - 1
        assert math.isfinite(held_out["perplexity"])
        assert (
            output_dir / variant / "checkpoint" / "latest_checkpointed_iteration.txt"
        ).read_text().strip() == "20"
    # --tiny: 2 layers of width 64; LPA's rank defaults to 64 / 4. Each of Q, K, V and O goes
    # from 64 x 64 weights to 16 x (64 + 64) factors, and nothing else changes.
    assert lpa["lpa_attn_rank"] == 16
    assert dense["parameters"] - lpa["parameters"] == 2 * 4 * (64 * 64 - 16 * (64 + 64))
    # The table shows the summary's figures.
    assert rows[1].split()[1:3] == ["16", f"{lpa['parameters']:,}"]
    assert rows[1].split()[-2] == f"{lpa['held_out']['perplexity']:.2f}"


def test_the_readme_commands_take_the_checkpoint_out(quickstart):
    """The commands the quickstart ends with are the README's (for its --output-dir); run here
    as printed, they evaluate, sample, export both ways for transformers and import back."""
    transformers = pytest.importorskip("transformers")
    output_dir, done = quickstart
    commands = [line.strip() for line in done.stdout.splitlines() if line.startswith("  python ")]
    assert [shlex.split(c)[1] for c in commands] == [
        "tools/evaluate.py",
        "tools/generate.py",
        "tools/export_hf.py",
        "tools/export_hf.py",
        "tools/import_hf.py",
    ]
    readme = (REPO / "README.md").read_text()
    for command in commands:
        assert command.replace(str(output_dir), "runs/quickstart") in readme, command
    outputs = []
    for command in commands:
        ran = subprocess.run(
            [sys.executable, *shlex.split(command)[1:]],
            cwd=REPO,
            env=_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ran.returncode == 0, f"{command}:\n{ran.stdout[-2000:]}\n{ran.stderr[-3000:]}"
        outputs.append(ran.stdout)
    evaluated, sampled, _, _, imported = outputs

    # evaluate.py gives the quickstart's own held-out figures.
    lpa = json.loads((output_dir / "summary.json").read_text())["variants"]["lpa"]["held_out"]
    row = evaluated.strip().splitlines()[-1].split()
    assert row[1:4] == [f"{lpa['tokens']:,}", f"{lpa['loss']:.4f}", f"{lpa['perplexity']:.2f}"]
    assert sampled.startswith(">>> Return the\n") and sampled.split("\n", 1)[1].strip()

    # Both exports load in transformers, give the same logits and generate.
    hf = output_dir / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf / "lpa_merged")
    merged = transformers.LlamaForCausalLM.from_pretrained(hf / "lpa_merged")
    factored = transformers.AutoModelForCausalLM.from_pretrained(
        hf / "lpa_factored", trust_remote_code=True
    )
    ids = torch.tensor([tokenizer("Return the value of the")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, factored(ids).logits, atol=1e-4, rtol=0)
        more = factored.generate(ids, max_new_tokens=4, do_sample=False)
    assert more.shape == (1, ids.shape[1] + 4)

    # The merged export comes back as a checkpoint to train on, factored at rank 16.
    assert "pretrain_gpt.py" in imported and "--lpa-attn-rank 16" in imported
    assert (output_dir / "imported" / "latest_checkpointed_iteration.txt").exists()
