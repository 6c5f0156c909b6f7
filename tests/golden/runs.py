"""The golden runs: tiny fixed-seed CPU trainings of ``pretrain_gpt.py`` on mock data, and how to
run one and read its per-step loss and gradient norm.

Each run's flags are written out here in full, so that ``tests/golden/<name>.json`` is a function of
this file, the trainer and the libraries only. ``python -m tests.golden.regenerate`` rewrites the
JSON files; ``test_golden_curves.py`` compares fresh runs with them.
"""

import json
from pathlib import Path

from tests.launch import pretrain_records

GOLDEN = Path(__file__).resolve().parent
STEPS = 20

# Mock data (random tokens from a fixed seed), 20 steps of 2 micro-batches, one log record per
# step; no evaluation, no data-loader workers. The vocabulary is not padded, so the loss is over
# exactly 256 ids at every TP size.
COMMON = (
    "--mock-data --vocab-size 256 --make-vocab-size-divisible-by 1 --seq-length 32 "
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --micro-batch-size 2 "
    f"--global-batch-size 4 --train-iters {STEPS} --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 3 "
    "--lr-decay-style cosine --seed 1234 --log-interval 1 --eval-iters 0 --num-workers 0"
).split()
# LLaMA-style block (the LPA runs): RMSNorm, SwiGLU, RoPE, no biases, untied head, no dropout.
LLAMA = (
    "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--untie-embeddings-and-output-weights --ffn-hidden-size 128 --num-query-groups 2 "
    "--hidden-dropout 0 --attention-dropout 0"
).split()

# name: (processes, flags after COMMON)
RUNS = {
    # GPT-style (LayerNorm, GELU, learned positions, biases, tied embeddings) with megatron's
    # default dropout of 0.1, so the dropout RNG streams are part of the curve.
    "dense": (1, ["--ffn-hidden-size", "128"]),
    "lpa": (1, [*LLAMA, "--lpa-attn-rank", "8"]),
    "lowrank_ffn": (1, [*LLAMA, "--lpa-ffn-rank", "16"]),
    "lpa_tp2_sp": (
        2,
        [
            *LLAMA,
            "--lpa-attn-rank",
            "8",
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
        ],
    ),
    "lpa_pp2": (2, [*LLAMA, "--lpa-attn-rank", "8", "--pipeline-model-parallel-size", "2"]),
}


def train(name: str) -> dict:
    """Runs ``RUNS[name]``; returns ``{"loss": [...], "grad_norm": [...]}`` per step, 1 to STEPS."""
    nproc, flags = RUNS[name]
    records = [r for r in pretrain_records(nproc, *COMMON, *flags) if r["split"] == "train"]
    steps = [r["iteration"] for r in records]
    assert steps == list(range(1, STEPS + 1)), f"golden run {name} logged steps {steps}"
    return {"loss": [r["lm loss"] for r in records], "grad_norm": [r["grad-norm"] for r in records]}


def golden_file(name: str) -> Path:
    return GOLDEN / f"{name}.json"


def load(name: str) -> dict:
    return json.loads(golden_file(name).read_text())


def write(name: str, curves: dict) -> None:
    nproc, flags = RUNS[name]
    record = {"run": name, "nproc": nproc, "flags": " ".join([*COMMON, *flags]), **curves}
    # json writes floats with repr(): every digit of the float, read back exactly.
    golden_file(name).write_text(json.dumps(record, indent=1) + "\n")
