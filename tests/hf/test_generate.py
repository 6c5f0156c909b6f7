"""tools/generate.py: greedy decoding with the key/value cache gives the ids that step-by-step
argmax of our own full forward (no cache) gives; sampling is reproducible with a seed; a prompt
that fills the model's positions is refused."""

import json
import os
import re
import subprocess
import sys

import torch

from megatron_lpa.hf.generation import Sampling, generate, next_token
from tests.data.conftest import REPO
from tests.hf.conftest import PROMPT, python
from tests.hf.reference_worker import GREEDY_TOKENS


def run_tool(load, tmp_path, *flags) -> list:
    out = tmp_path / f"generated_{len(list(tmp_path.iterdir()))}.jsonl"
    python(
        "tools/generate.py",
        "--load",
        load,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        GREEDY_TOKENS,
        "--output",
        out,
        *flags,
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_greedy_with_cache_is_our_step_by_step_argmax(checkpoints, exported, tmp_path):
    reference, _ = exported("llama_lpa_gqa_bias")
    [result] = run_tool(checkpoints("llama_lpa_gqa_bias"), tmp_path, "--greedy")
    ids, expected = result["ids"], reference["greedy"]
    # The tool stops after an end-of-document token; the reference runs on.
    assert ids == expected[: len(ids)]
    assert len(ids) == GREEDY_TOKENS or ids[-1] == 2  # SentencePiece's </s>


def test_sampling_is_reproducible_with_a_seed(exported):
    from transformers import AutoModelForCausalLM

    reference, out = exported("gpt_output_norm_lowrank_all")
    model = AutoModelForCausalLM.from_pretrained(
        out / "factored", trust_remote_code=True, dtype=torch.float32
    ).eval()
    sampling = Sampling(temperature=1.5, top_k=50, top_p=0.95)

    def sample(seed):
        return generate(
            model, reference["prompt"], 16, sampling, generator=torch.Generator().manual_seed(seed)
        )

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, Sampling(top_k=2), generator)) for _ in range(200)}
    assert draws == {1, 2}
    # softmax: 0.70, 0.26, 0.03, 0.01: p=0.5 keeps the first token only, p=0.8 the first two.
    assert {int(next_token(logits, Sampling(top_p=0.5), generator)) for _ in range(50)} == {1}
    assert {int(next_token(logits, Sampling(top_p=0.8), generator)) for _ in range(200)} == {1, 2}
    assert int(next_token(logits, Sampling(greedy=True), None)) == 1


def test_a_prompt_as_long_as_the_model_is_refused(checkpoints):
    # SHAPE's --seq-length 32: a prompt of 32 tokens or more leaves no position to generate in.
    long_prompt = " ".join([PROMPT] * 20)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/generate.py"),
            "--load",
            str(checkpoints("llama_lpa_gqa_bias")),
            "--prompt",
            long_prompt,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
    )
    assert done.returncode == 1
    assert re.search(
        r"a prompt of \d+ tokens leaves no room: the model takes 32 positions; "
        r"shorten it\.",
        done.stderr,
    ), done.stderr[-2000:]
