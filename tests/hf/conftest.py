"""Tiny trained checkpoints for the Hugging Face tests: a tokenizer and dataset from our tools,
then ``pretrain_gpt.py`` on two processes at TP=2 or PP=2."""

import os
import subprocess
import sys

import pytest
import torch

from tests.data.conftest import REPO, load_tool, make_documents, write_jsonl
from tests.launch import torchrun

pytest.importorskip("transformers")

# 350 pieces: padded to 384 rows at TP=1 but 512 at TP=2, so a TP=2 checkpoint exports only if
# the export keeps the rows the checkpoint was saved with.
VOCAB = 350
PROMPT = "Riextami soexquda kathon"
SHAPE = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 --seq-length 32"
).split()
LLAMA = (
    "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--rotary-base 5000 --norm-epsilon 1e-6"
).split()
GPT = "--normalization LayerNorm --position-embedding-type learned_absolute".split()
# Each kind, the layout it is trained at and its flags; together they cover both families, both
# block forms, the four variants, GQA, biases (r-wide ones included), an output-layer bias and
# tied and untied heads.
KINDS = {
    # LLaMA-style with biases: Llama's attention_bias and mlp_bias, A's r-wide bias c merged
    # into the dense bias B c.
    "llama_lpa_gqa_bias": (
        ["--tensor-model-parallel-size", "2"],
        [f for f in LLAMA if f != "--disable-bias-linear"]
        + [
            "--untie-embeddings-and-output-weights",
            "--lpa-attn-rank",
            "8",
            "--num-query-groups",
            "2",
        ],
    ),
    "llama_lowrank_ffn_tied": (
        ["--pipeline-model-parallel-size", "2"],
        LLAMA + ["--lpa-ffn-rank", "8"],
    ),
    "gpt_output_norm_lowrank_all": (
        ["--tensor-model-parallel-size", "2"],
        GPT
        + [
            "--activation",
            "gelu",
            "--sublayer-norm",
            "output",
            "--output-layer-bias",
            "--untie-embeddings-and-output-weights",
            "--lpa-attn-rank",
            "8",
            "--lpa-ffn-rank",
            "8",
        ],
    ),
    "gpt_relu_dense": (["--pipeline-model-parallel-size", "2"], GPT + ["--activation", "relu"]),
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A SentencePiece tokenizer (``tok.model``) and an indexed dataset of its documents."""
    root = tmp_path_factory.mktemp("hf_corpus")
    source = write_jsonl(root / "corpus.jsonl", [{"text": t} for t in make_documents(200)])
    assert (
        load_tool("train_tokenizer").main(
            f"--input {source} --model-prefix {root / 'tok'} --vocab-size {VOCAB} "
            "--num-threads 1 --character-coverage 0.98".split()
        )
        == 0
    )
    assert (
        load_tool("preprocess_data").main(
            f"--input {source} --output-prefix {root / 'corpus'} --append-eod --workers 1 "
            f"--tokenizer-type GPTSentencePieceTokenizer "
            f"--tokenizer-model {root / 'tok.model'}".split()
        )
        == 0
    )
    return root


def python(script: str, *args) -> subprocess.CompletedProcess:
    """Runs ``script`` (relative to the repository) in a new process; fails with its output."""
    done = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def train(corpus, save, layout: list, flags: list, iters: int = 4) -> None:
    torchrun(
        str(REPO / "pretrain_gpt.py"),
        2,
        *SHAPE,
        *layout,
        *flags,
        "--tokenizer-type",
        "GPTSentencePieceTokenizer",
        "--tokenizer-model",
        corpus / "tok.model",
        "--data-path",
        corpus / "corpus_text_document",
        "--split",
        "98,1,1",
        "--lr",
        "1e-2",
        "--micro-batch-size",
        "4",
        "--train-iters",
        str(iters),
        "--eval-iters",
        "0",
        "--num-workers",
        "0",
        "--save",
        save,
    )


@pytest.fixture(scope="session")
def checkpoints(corpus, tmp_path_factory):
    """``{kind: directory}`` of a checkpoint trained 4 steps at its layout, on demand."""
    root, made = tmp_path_factory.mktemp("hf_checkpoints"), {}

    def get(kind: str):
        if kind not in made:
            layout, flags = KINDS[kind]
            train(corpus, root / kind, layout, flags)
            made[kind] = root / kind
        return made[kind]

    return get


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory):
    """``{kind: (reference, export directory)}``: our logits and greedy ids, and the exports."""
    made = {}

    def get(kind: str):
        if kind not in made:
            out = tmp_path_factory.mktemp(f"export_{kind}")
            python(
                "tests/hf/reference_worker.py",
                "--load",
                checkpoints(kind),
                "--out",
                out / "ref.pt",
                "--export-dir",
                out,
                "--prompt",
                PROMPT,
            )
            made[kind] = torch.load(out / "ref.pt"), out
        return made[kind]

    return get
