"""Training datasets through megatron-core: blends, splits, validation, caching, ranks."""

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lpa.data import DataConfig, build_train_valid_test_datasets
from megatron_lpa.data.gpt_datasets import DataConfigError, parse_data_path, validate_data_config
from megatron_lpa.data.indexed_reader import IndexedDatasetReader
from megatron_lpa.data.indexed_writer import IndexedDatasetWriter
from megatron_lpa.tokenizers import build_tokenizer

EOD = 1000  # NullTokenizer(vocab_size=1000).eod


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("NullTokenizer", vocab_size=EOD)


def _make_dataset(prefix, documents: int, first_id: int, seed: int = 0) -> str:
    """Documents of ids from a range of its own (so samples show their source), ending in EOD."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), np.uint16) as writer:
        for _ in range(documents):
            ids = rng.integers(first_id, first_id + 100, rng.integers(5, 40))
            writer.add_document(np.append(ids, EOD))
        writer.finalize()
    return str(prefix)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    return {
        "a": _make_dataset(root / "a_text_document", 300, 0),
        "b": _make_dataset(root / "b_text_document", 300, 500, seed=1),
        "tiny": _make_dataset(root / "tiny", 20, 0, seed=2),
    }


def test_parse_data_path():
    assert parse_data_path(["data/a"]) == (["data/a"], None)
    assert parse_data_path(["data/a", "data/b"]) == (["data/a", "data/b"], None)
    assert parse_data_path(["0.3 data/a 0.7", "data/b"]) == (["data/a", "data/b"], [0.3, 0.7])
    with pytest.raises(DataConfigError, match="must alternate"):
        parse_data_path(["0.3", "data/a", "data/b"])
    with pytest.raises(DataConfigError, match="must be finite numbers > 0, got 0 in"):
        parse_data_path(["0", "data/a", "1", "data/b"])
    with pytest.raises(DataConfigError, match="--train-data-path is empty"):
        parse_data_path([" "], "--train-data-path")


def test_blend_weights_are_honoured(datasets, tokenizer, tmp_path):
    config = DataConfig(
        data_path=["1", datasets["a"], "3", datasets["b"]],
        split="98,2,0",
        seq_length=16,
        data_cache_path=str(tmp_path / "cache"),
    )
    train, valid, test = build_train_valid_test_datasets(config, tokenizer, [2000, 40, 0])
    assert test is None
    assert len(train) == 2000
    counts = np.bincount([train[i]["dataset_id"] for i in range(len(train))], minlength=2)
    assert abs(counts[0] - 500) <= 2 and abs(counts[1] - 1500) <= 2
    for i in range(0, 2000, 97):  # each sample's tokens come from the dataset it names
        sample = train[i]
        tokens = sample["tokens"][sample["tokens"] != EOD]
        low = 0 if sample["dataset_id"] == 0 else 500
        assert ((tokens >= low) & (tokens < low + 100)).all()
        assert sample["tokens"].shape == (16,) and sample["labels"].shape == (16,)
    assert len(list((tmp_path / "cache").iterdir())) > 0

    # A second build hits the cache and yields the same samples.
    again, _, _ = build_train_valid_test_datasets(config, tokenizer, [2000, 40, 0])
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 2000, 101))


def test_separate_train_valid_test_paths(datasets, tokenizer):
    config = DataConfig(
        train_data_path=[datasets["a"]], valid_data_path=[datasets["b"]], seq_length=16
    )
    train, valid, test = build_train_valid_test_datasets(config, tokenizer, [100, 30, 10])
    assert len(train) >= 100 and len(valid) >= 30 and test is None
    assert (valid[0]["tokens"][valid[0]["tokens"] != EOD] >= 500).all()


def test_split_without_documents_is_a_clear_error(datasets, tokenizer):
    # 20 documents split 969,30,1: test gets documents [20, 20), none. megatron-core would
    # loop forever building it, even for 0 samples.
    config = DataConfig(data_path=[datasets["tiny"]], split="969,30,1", seq_length=16)
    for samples in ([100, 10, 5], [100, 10, 0]):
        with pytest.raises(DataConfigError) as error:
            build_train_valid_test_datasets(config, tokenizer, samples)
        message = str(error.value)
        assert "test split documents [20, 20) of the 20" in message and "hang" in message
        assert "larger share of --split" in message and "--split 969,30,0" in message
    config = DataConfig(data_path=[datasets["tiny"]], split="969,30,0", seq_length=16)
    train, valid, test = build_train_valid_test_datasets(config, tokenizer, [100, 10, 5])
    assert len(train) >= 100 and len(valid) >= 10 and test is None
    empty = _make_dataset(Path(datasets["tiny"]).parent / "empty", 0, 0)
    with pytest.raises(DataConfigError, match="--valid-data-path .*empty holds no tokens"):
        validate_data_config(
            DataConfig(train_data_path=[datasets["a"]], valid_data_path=[empty], seq_length=8)
        )


def test_missing_data_names_the_flag_and_the_fix(datasets, tokenizer, tmp_path):
    with pytest.raises(DataConfigError, match=r"--data-path: no usable dataset at prefix .*nope"):
        validate_data_config(DataConfig(data_path=[str(tmp_path / "nope")], seq_length=8))
    stem = datasets["a"][: -len("_text_document")]
    with pytest.raises(DataConfigError, match="did you mean .*a_text_document"):
        validate_data_config(DataConfig(data_path=[stem], seq_length=8))
    with pytest.raises(DataConfigError, match="without the extension"):
        validate_data_config(DataConfig(data_path=[datasets["a"] + ".bin"], seq_length=8))
    with pytest.raises(DataConfigError, match="--valid-data-path: no usable dataset"):
        config = DataConfig(train_data_path=[datasets["a"]], valid_data_path=["x"], seq_length=8)
        validate_data_config(config)
    with pytest.raises(DataConfigError, match="not both"):
        validate_data_config(
            DataConfig(data_path=[datasets["a"]], train_data_path=[datasets["a"]], seq_length=8)
        )
    with pytest.raises(DataConfigError, match="no training data"):
        validate_data_config(DataConfig(seq_length=8))
    with pytest.raises(DataConfigError, match="--seq-length"):
        validate_data_config(DataConfig(data_path=[datasets["a"]]))
    assert IndexedDatasetReader(datasets["a"]).num_documents == 300


def test_builds_with_and_without_a_process_group(datasets, tokenizer, tmp_path):
    def train_tokens(cache):
        config = DataConfig(
            data_path=["0.5", datasets["a"], "0.5", datasets["b"]],
            split="90,10,0",
            seq_length=16,
            data_cache_path=str(cache),
        )
        train, _, _ = build_train_valid_test_datasets(config, tokenizer, [300, 20, 0])
        return torch.stack([train[i]["tokens"] for i in range(len(train))])

    without_group = train_tokens(tmp_path / "cache-single")
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        with_group = train_tokens(tmp_path / "cache-distributed")
    finally:
        torch.distributed.destroy_process_group()
    assert without_group.shape[0] >= 300 and torch.equal(without_group, with_group)
