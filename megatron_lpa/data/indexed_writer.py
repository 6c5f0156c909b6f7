"""Writes indexed datasets (.bin/.idx) that appear only when complete.

Everything goes to ``*.tmp`` files first; ``finalize`` writes the index, then renames the
``.bin`` and, last, the ``.idx`` into place. An interrupted or failed run therefore never
leaves a pair that looks finished, and an earlier finished pair at the same path stays as it
was until the new one is complete. Per-sequence sizes are spilled to temporary files rather
than held in memory, so memory stays flat however large the dataset grows.
"""

import os
import shutil
from typing import BinaryIO, Iterable

import numpy as np

from megatron_lpa.data.indexed_format import (
    DTYPE_CODES,
    INDEX_HEADER,
    INDEX_MAGIC,
    INDEX_VERSION,
    bin_path,
    idx_path,
)
from megatron_lpa.data.indexed_reader import IndexedDatasetError, IndexedDatasetReader

_CHUNK = 1 << 22  # array elements per read/write when streaming sizes


def _chunks(array: np.ndarray) -> Iterable[np.ndarray]:
    for start in range(0, len(array), _CHUNK):
        yield array[start : start + _CHUNK]


def _read_chunks(path: str, dtype: type) -> Iterable[np.ndarray]:
    with open(path, "rb") as f:
        while data := f.read(_CHUNK * np.dtype(dtype).itemsize):
            yield np.frombuffer(data, dtype=dtype)


class IndexedDatasetWriter:
    """Builds one dataset; use as a context manager so a failure discards the partial files.

    Args:
        path_prefix: The dataset, without ``.bin``/``.idx``.
        dtype: Token dtype; ``optimal_token_dtype(vocab_size)`` for token datasets.
    """

    def __init__(self, path_prefix: str, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"indexed datasets cannot hold {self.dtype}")
        self._bin_path, self._idx_path = bin_path(path_prefix), idx_path(path_prefix)
        self._temporary = {
            "bin": self._bin_path + ".tmp",
            "idx": self._idx_path + ".tmp",
            "lengths": self._idx_path + ".lengths.tmp",
            "document_ends": self._idx_path + ".documents.tmp",
        }
        os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
        self._files: dict[str, BinaryIO] = {}
        for name in ("bin", "lengths", "document_ends"):
            self._files[name] = open(self._temporary[name], "wb")
        self.sequence_count = 0
        self.document_count = 0
        self.token_count = 0

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is not None:
            self.discard()

    def add_documents(
        self,
        tokens: np.ndarray,
        sequence_lengths: np.ndarray,
        sequences_per_document: np.ndarray | None = None,
    ) -> None:
        """Appends documents.

        Args:
            tokens: All their token ids back to back.
            sequence_lengths: Tokens in each sequence; they sum to ``len(tokens)``.
            sequences_per_document: Sequences in each document; None when each sequence is a
                document.
        """
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            limits = np.iinfo(self.dtype)
            if tokens.size and (tokens.min() < limits.min or tokens.max() > limits.max):
                raise ValueError(f"token ids outside the range of {self.dtype}")
            tokens = tokens.astype(self.dtype)
        lengths = np.asarray(sequence_lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != len(tokens):
            raise ValueError(f"sequence lengths sum to {lengths.sum()}, not {len(tokens)} tokens")
        if sequences_per_document is None:
            document_ends = np.arange(1, len(lengths) + 1, dtype=np.int64)
        else:
            document_ends = np.cumsum(sequences_per_document, dtype=np.int64)
            if len(document_ends) and document_ends[-1] != len(lengths):
                raise ValueError("sequences_per_document does not add up to the sequences given")
        self._files["bin"].write(tokens.tobytes())
        self._files["lengths"].write(lengths.tobytes())
        self._files["document_ends"].write((document_ends + self.sequence_count).tobytes())
        self.sequence_count += len(lengths)
        self.document_count += len(document_ends)
        self.token_count += len(tokens)

    def add_document(self, tokens: np.ndarray, sequence_lengths: list[int] | None = None) -> None:
        """Appends one document; one sequence unless ``sequence_lengths`` splits it."""
        lengths = [len(tokens)] if sequence_lengths is None else sequence_lengths
        self.add_documents(tokens, np.asarray(lengths), np.array([len(lengths)]))

    def add_dataset(self, path_prefix: str) -> None:
        """Appends every document of an existing dataset of the same dtype (merging)."""
        source = IndexedDatasetReader(path_prefix)
        if source.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{path_prefix} holds {source.dtype} tokens, not {self.dtype}: datasets merge "
                "only when made with the same tokenizer"
            )
        with open(bin_path(path_prefix), "rb") as data:
            shutil.copyfileobj(data, self._files["bin"], _CHUNK)
        for chunk in _chunks(source.sequence_lengths):
            self._files["lengths"].write(chunk.tobytes())
        for chunk in _chunks(source.document_indices[1:]):
            self._files["document_ends"].write((chunk + self.sequence_count).tobytes())
        self.sequence_count += source.num_sequences
        self.document_count += source.num_documents
        self.token_count += int(source.sequence_lengths.sum(dtype=np.int64))

    def finalize(self) -> None:
        """Writes the index and moves both files into place, the .idx last."""
        for f in self._files.values():
            f.close()
        with open(self._temporary["idx"], "wb") as index:
            index.write(
                INDEX_HEADER.pack(
                    INDEX_MAGIC,
                    INDEX_VERSION,
                    DTYPE_CODES[self.dtype],
                    self.sequence_count,
                    self.document_count + 1,
                )
            )
            with open(self._temporary["lengths"], "rb") as lengths:
                shutil.copyfileobj(lengths, index, _CHUNK)
            position = 0  # byte offset of the next sequence in the .bin
            for lengths in _read_chunks(self._temporary["lengths"], np.int32):
                ends = np.cumsum(lengths, dtype=np.int64) * self.dtype.itemsize + position
                index.write((ends - lengths * self.dtype.itemsize).tobytes())
                position = int(ends[-1])
            index.write(np.zeros(1, dtype=np.int64).tobytes())
            with open(self._temporary["document_ends"], "rb") as document_ends:
                shutil.copyfileobj(document_ends, index, _CHUNK)
            index.flush()
            os.fsync(index.fileno())
        with open(self._temporary["bin"], "rb+") as data:
            os.fsync(data.fileno())
        for name in ("lengths", "document_ends"):
            os.remove(self._temporary[name])
        # Without this, a crash between the two renames would pair the new .bin with an old
        # .idx: a dataset that looks finished and is wrong.
        if os.path.exists(self._idx_path):
            os.remove(self._idx_path)
        os.replace(self._temporary["bin"], self._bin_path)
        os.replace(self._temporary["idx"], self._idx_path)

    def discard(self) -> None:
        """Closes and deletes the temporary files; finished files are left alone."""
        for f in self._files.values():
            f.close()
        for path in self._temporary.values():
            if os.path.exists(path):
                os.remove(path)


def merge_indexed_datasets(input_prefixes: list[str], output_prefix: str) -> IndexedDatasetWriter:
    """Concatenates datasets, in order, into ``output_prefix``; returns the finished writer
    (its counts describe the result).

    Raises:
        IndexedDatasetError: An input is missing or damaged, or the dtypes differ.
    """
    first = IndexedDatasetReader(input_prefixes[0])
    with IndexedDatasetWriter(output_prefix, first.dtype) as writer:
        for prefix in input_prefixes:
            writer.add_dataset(prefix)
        writer.finalize()
    return writer
