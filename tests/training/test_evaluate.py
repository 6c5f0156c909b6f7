"""tools/evaluate.py: perplexity and bits per byte of a checkpoint, every token predicted once, the
same numbers from a JSON-lines file and its indexed dataset, at TP=1, TP=2 and PP=2."""

import json
import math

import numpy as np
import pytest

from megatron_lpa.tokenizers import build_tokenizer
from tests.data.conftest import REPO, load_tool, make_documents, write_jsonl
from tests.launch import torchrun

SHAPE = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
    "--seq-length 32 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--disable-bias-linear --untie-embeddings-and-output-weights --lpa-attn-rank 8"
).split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LPA model trained for 8 steps on our tools' data; its checkpoint and data."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": t} for t in make_documents(200)])
    held_out = write_jsonl(root / "held_out.jsonl", [{"text": t} for t in make_documents(20, 9)])
    # 350 pieces pad to 384 rows at TP=1 but 512 at TP=2: evaluating at TP=2 must keep the 384
    # rows this TP=1 run saved.
    assert (
        load_tool("train_tokenizer").main(
            f"--input {corpus} --model-prefix {root / 'tok'} --vocab-size 350 --num-threads 1 "
            "--character-coverage 0.98".split()
        )
        == 0
    )
    tokenizer = [
        "--tokenizer-type",
        "GPTSentencePieceTokenizer",
        "--tokenizer-model",
        str(root / "tok.model"),
    ]
    for source, prefix in ((corpus, "corpus"), (held_out, "held_out")):
        assert (
            load_tool("preprocess_data").main(
                [
                    *f"--input {source} --output-prefix {root / prefix}".split(),
                    *"--append-eod --workers 1".split(),
                    *tokenizer,
                ]
            )
            == 0
        )
    torchrun(
        str(REPO / "pretrain_gpt.py"),
        1,
        *SHAPE,
        *tokenizer,
        "--data-path",
        root / "corpus_text_document",
        "--split",
        "98,1,1",
        "--lr",
        "1e-2",
        "--micro-batch-size",
        "4",
        "--train-iters",
        "8",
        "--eval-iters",
        "0",
        "--num-workers",
        "0",
        "--save",
        root / "ckpt",
    )
    return root


def evaluate(trained, nproc: int, *flags) -> dict:
    out = trained / f"eval_{nproc}_{'_'.join(flags)}.json"
    torchrun(
        str(REPO / "tools/evaluate.py"),
        nproc,
        "--load",
        trained / "ckpt",
        "--data",
        trained / "held_out.jsonl",
        trained / "held_out_text_document",
        "--micro-batch-size",
        "2",
        "--output",
        out,
        *flags,
    )
    return json.loads(out.read_text())["datasets"]


def test_every_token_is_predicted_once_and_counted_in_bytes(trained):
    results = evaluate(trained, 1)
    from_jsonl, from_index = results.values()
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", str(trained / "tok.model"))
    stream = []
    for line in (trained / "held_out.jsonl").read_text().splitlines():
        stream += tokenizer.tokenize(json.loads(line)["text"]) + [tokenizer.eod]
    assert from_jsonl["tokens"] == len(stream) - 1
    assert from_jsonl["bytes"] == int(tokenizer.token_bytes()[np.array(stream[1:])].sum())
    assert from_jsonl["bits_per_byte"] == pytest.approx(
        from_jsonl["loss"] * from_jsonl["tokens"] / math.log(2) / from_jsonl["bytes"]
    )
    assert from_jsonl["perplexity"] == pytest.approx(math.exp(from_jsonl["loss"]))
    # The trained model has learnt something: below a uniform guess over the vocabulary.
    assert from_jsonl["loss"] < math.log(350)
    # The indexed dataset the preprocessing tool wrote holds the same stream.
    for key in ("tokens", "bytes"):
        assert from_index[key] == from_jsonl[key]
    assert from_index["loss"] == pytest.approx(from_jsonl["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "layout",
    [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
    ids=["tp2", "pp2"],
)
def test_same_numbers_at_another_layout(trained, layout):
    single, parallel = evaluate(trained, 1), evaluate(trained, 2, *layout)
    for source in single:
        assert parallel[source]["tokens"] == single[source]["tokens"]
        assert parallel[source]["loss"] == pytest.approx(single[source]["loss"], rel=1e-5)
