"""Indexed datasets: byte compatibility with megatron-core both ways, merging, safety."""

import filecmp

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_lpa.data import indexed_writer
from megatron_lpa.data.indexed_reader import IndexedDatasetError, IndexedDatasetReader
from megatron_lpa.data.indexed_writer import IndexedDatasetWriter, merge_indexed_datasets
from tests.data.conftest import load_tool


def _documents(seed: int, count: int, high: int) -> list[list[np.ndarray]]:
    """Documents as lists of sequences (sentences) of random ids below ``high``."""
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, high, rng.integers(1, 40)) for _ in range(rng.integers(1, 4))]
        for _ in range(count)
    ]


def _write_ours(prefix, documents, dtype):
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        half = len(documents) // 2
        for sequences in documents[:half]:  # one at a time
            writer.add_document(np.concatenate(sequences), [len(s) for s in sequences])
        rest = documents[half:]  # and in one batch
        writer.add_documents(
            np.concatenate([s for sequences in rest for s in sequences]),
            np.array([len(s) for sequences in rest for s in sequences]),
            np.array([len(sequences) for sequences in rest]),
        )
        writer.finalize()


def _write_megatron(prefix, documents, dtype):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in documents:
        builder.add_document(
            torch.from_numpy(np.concatenate(sequences)), [len(s) for s in sequences]
        )
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65000), (np.int32, 200_000)])
def test_writer_is_byte_identical_to_megatron_core(tmp_path, dtype, high):
    documents = _documents(0, 60, high)
    _write_ours(tmp_path / "ours", documents, dtype)
    _write_megatron(tmp_path / "megatron", documents, dtype)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(
            tmp_path / f"ours{suffix}", tmp_path / f"megatron{suffix}", shallow=False
        )


def test_writer_streams_sizes_in_chunks(tmp_path, monkeypatch):
    # Index sizes are spilled to disk and streamed back in chunks; tiny chunks check the seams.
    monkeypatch.setattr(indexed_writer, "_CHUNK", 7)
    documents = _documents(4, 40, 30000)
    _write_ours(tmp_path / "ours", documents, np.uint16)
    merge_indexed_datasets([str(tmp_path / "ours")] * 2, str(tmp_path / "twice"))
    _write_megatron(tmp_path / "megatron", documents + documents, np.uint16)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(
            tmp_path / f"twice{suffix}", tmp_path / f"megatron{suffix}", shallow=False
        )


def test_megatron_core_reads_ours_and_we_read_megatron_core(tmp_path):
    documents = _documents(1, 50, 30000)
    _write_ours(tmp_path / "ours", documents, np.uint16)
    _write_megatron(tmp_path / "megatron", documents, np.uint16)

    theirs = IndexedDataset(str(tmp_path / "ours"))
    all_sequences = [s for sequences in documents for s in sequences]
    assert len(theirs) == len(all_sequences)
    assert all(np.array_equal(theirs[i], s) for i, s in enumerate(all_sequences))
    ends = np.cumsum([0] + [len(s) for s in documents])
    assert theirs.document_indices.tolist() == ends.tolist()

    ours = IndexedDatasetReader(str(tmp_path / "megatron"))
    assert ours.dtype == np.uint16 and ours.num_documents == len(documents)
    for i, sequences in enumerate(documents):
        assert np.array_equal(ours.document(i), np.concatenate(sequences))
    assert all(np.array_equal(ours.sequence(i), s) for i, s in enumerate(all_sequences))


def test_merge_matches_megatron_core_and_keeps_order(tmp_path):
    parts = [_documents(seed, 20, 30000) for seed in range(3)]
    for i, documents in enumerate(parts):
        _write_ours(tmp_path / f"part{i}", documents, np.uint16)
    merged = merge_indexed_datasets(
        [str(tmp_path / f"part{i}") for i in range(3)], str(tmp_path / "all")
    )
    assert merged.document_count == 60
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for i in range(3):
        builder.add_index(str(tmp_path / f"part{i}"))
    builder.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"all{suffix}", tmp_path / f"ref{suffix}", shallow=False)
    reader = IndexedDatasetReader(str(tmp_path / "all"))
    flat = [np.concatenate(s) for documents in parts for s in documents]
    assert all(np.array_equal(reader.document(i), d) for i, d in enumerate(flat))


def test_merge_tool_takes_directories_and_refuses_mixed_dtypes(tmp_path, capsys):
    merge = load_tool("merge_datasets").main
    (tmp_path / "shards").mkdir()
    for i in range(2):
        _write_ours(tmp_path / "shards" / f"s{i}", _documents(i, 5, 1000), np.uint16)
    assert merge(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert IndexedDatasetReader(str(tmp_path / "m")).num_documents == 10
    _write_ours(tmp_path / "wide", _documents(9, 5, 100_000), np.int32)
    status = merge(
        [
            "--input",
            str(tmp_path / "m"),
            str(tmp_path / "wide"),
            "--output-prefix",
            str(tmp_path / "x"),
        ]
    )
    assert status == 1 and "same tokenizer" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_reader_rejects_damaged_pairs(tmp_path):
    _write_ours(tmp_path / "d", _documents(2, 10, 1000), np.uint16)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-2])
    with pytest.raises(IndexedDatasetError, match="do not belong together"):
        IndexedDatasetReader(str(tmp_path / "d"))
    (tmp_path / "d.idx").write_bytes((tmp_path / "d.idx").read_bytes()[:40])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDatasetReader(str(tmp_path / "d"))
    (tmp_path / "d.idx").write_bytes(b"not an index at all, honestly")
    with pytest.raises(IndexedDatasetError, match="not a Megatron"):
        IndexedDatasetReader(str(tmp_path / "d"))
    with pytest.raises(IndexedDatasetError, match="does not exist"):
        IndexedDatasetReader(str(tmp_path / "nothing"))


def test_writer_publishes_only_finished_pairs(tmp_path):
    prefix = str(tmp_path / "d")
    _write_ours(prefix, _documents(3, 5, 1000), np.uint16)
    finished = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document(np.arange(10))
            raise RuntimeError("interrupted")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == finished
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document(np.arange(10))
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".tmp") == [
            "d.bin",
            "d.idx",
        ]
        writer.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    assert IndexedDatasetReader(prefix).document(0).tolist() == list(range(10))


def test_writer_refuses_ids_its_dtype_cannot_hold(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as writer:
        with pytest.raises(ValueError, match="outside the range"):
            writer.add_document(np.array([70000], dtype=np.int64))
        writer.discard()
