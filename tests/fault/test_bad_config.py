"""Bad training settings stop the run before the model is built, with a message that names the
flag or file: blend weights that are not finite, a warm-up as long as the schedule, data made with
a larger vocabulary than the model's."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_lpa.config.command_line import parse_args
from megatron_lpa.data.indexed_writer import IndexedDatasetWriter
from megatron_lpa.training.data_loading import check_data, micro_batches
from tests.training.test_pretrain_e2e import PRETRAIN, VALID

pytestmark = pytest.mark.fault

DOCUMENT_TOKENS = 20


def dataset(prefix, largest_id: int, documents: int = 50) -> str:
    """An indexed dataset of ``documents`` documents whose ids go up to ``largest_id``."""
    ids = np.linspace(0, largest_id, documents * DOCUMENT_TOKENS).round().astype(np.uint16)
    with IndexedDatasetWriter(str(prefix), np.uint16) as writer:
        for document in ids.reshape(documents, DOCUMENT_TOKENS):
            writer.add_document(document)
        writer.finalize()
    return str(prefix)


def real_data_flags(*data_path: str) -> list:
    return [
        *VALID[: VALID.index("--mock-data")],
        "--data-path",
        *data_path,
        "--split",
        "100,0,0",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "100",
        "--eval-iters",
        "0",
        "--num-workers",
        "0",
    ]


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e400"])
def test_blend_weight_that_is_not_a_finite_number_is_a_configuration_error(
    tmp_path, monkeypatch, weight
):
    monkeypatch.setenv("WORLD_SIZE", "1")
    a, b = dataset(tmp_path / "a", 99), dataset(tmp_path / "b", 99)
    # One value, as a shell would pass "w1 p1 w2 p2" in quotes (argparse takes "-inf" alone for
    # a flag).
    cfg = parse_args(real_data_flags(f"{weight} {a} 1 {b}"))
    message = (
        f"Configuration error: --data-path: blend weights must be finite numbers > 0, got "
        f"{weight} in {weight} {a} 1 {b}"
    )
    with pytest.raises(SystemExit, match=re.escape(message)):
        check_data(cfg)


@pytest.mark.parametrize(
    "schedule, message",
    [
        (
            "--lr-warmup-iters 2",
            "--lr-warmup-iters gives 2 warm-up steps, but the schedule has 2 "
            "steps (--train-iters 2)",
        ),
        (
            "--lr-warmup-iters 5 --lr-decay-iters 4",
            "--lr-warmup-iters gives 5 warm-up steps, but "
            "the schedule has 4 steps (--lr-decay-iters 4)",
        ),
        ("--lr-warmup-fraction 1.0", "--lr-warmup-fraction gives 2 warm-up steps"),
    ],
    ids=["warmup_iters", "warmup_past_decay_iters", "warmup_fraction"],
)
def test_warmup_as_long_as_the_schedule_is_a_configuration_error(monkeypatch, schedule, message):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match=re.escape(f"Configuration error: {message}")):
        parse_args(VALID + schedule.split())  # VALID trains 2 iterations


def test_data_with_a_larger_vocabulary_stops_before_the_model_is_built(tmp_path):
    prefix = dataset(tmp_path / "big_vocab", 999)
    run = subprocess.run(
        [sys.executable, PRETRAIN, *real_data_flags(prefix)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert run.returncode != 0
    assert (
        f"Configuration error: --data-path {prefix} holds token id 999, but the tokenizer has "
        "only 101 ids: the data was made with another tokenizer"
    ) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_a_batch_past_the_vocabulary_stops_the_run_before_the_model_sees_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = parse_args(VALID + ["--micro-batch-size", "1", "--num-workers", "0"])
    sample = {"tokens": torch.tensor([1, 2, 300]), "labels": torch.tensor([2, 300, 4])}
    batches = micro_batches([sample], 0, cfg, dp_rank=0, vocab_size=128)
    with pytest.raises(
        SystemExit,
        match="Data error: a batch holds token id 300, but the model's vocabulary has 128 ids",
    ):
        next(batches)
