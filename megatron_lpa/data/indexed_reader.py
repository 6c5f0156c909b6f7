"""Reads indexed datasets (.bin/.idx) through memory maps, checking the files first."""

import os

import numpy as np

from megatron_lpa.data.indexed_format import (
    CODE_DTYPES,
    INDEX_HEADER,
    INDEX_MAGIC,
    INDEX_VERSION,
    bin_path,
    idx_path,
)


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, damaged or inconsistent; the message names the file."""


class IndexedDatasetReader:
    """An indexed dataset, memory-mapped (nothing is loaded whole).

    Args:
        path_prefix: The dataset, without ``.bin``/``.idx``.

    Raises:
        IndexedDatasetError: A file is missing, not in the format, or the pair disagrees.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        index_file, data_file = idx_path(path_prefix), bin_path(path_prefix)
        for path in (index_file, data_file):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path} does not exist")
        with open(index_file, "rb") as f:
            header = f.read(INDEX_HEADER.size)
        if len(header) < INDEX_HEADER.size or not header.startswith(INDEX_MAGIC):
            raise IndexedDatasetError(f"{index_file} is not a Megatron indexed-dataset index")
        _, version, code, sequences, document_entries = INDEX_HEADER.unpack(header)
        if version != INDEX_VERSION or code not in CODE_DTYPES or document_entries < 1:
            raise IndexedDatasetError(
                f"{index_file}: unsupported version {version}, dtype code {code} or "
                f"document count {document_entries}"
            )
        self.dtype = CODE_DTYPES[code]
        expected = INDEX_HEADER.size + 12 * sequences + 8 * document_entries
        if os.path.getsize(index_file) < expected:
            raise IndexedDatasetError(f"{index_file} is truncated; rebuild the dataset")
        index = np.memmap(index_file, mode="r", dtype=np.uint8)
        offset = INDEX_HEADER.size
        self.sequence_lengths = index[offset : offset + 4 * sequences].view(np.int32)
        offset += 4 * sequences
        self.sequence_pointers = index[offset : offset + 8 * sequences].view(np.int64)
        offset += 8 * sequences
        self.document_indices = index[offset : offset + 8 * document_entries].view(np.int64)
        data_size = os.path.getsize(data_file)
        end = (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if sequences
            else 0
        )
        if data_size != end or self.document_indices[-1] != sequences:
            raise IndexedDatasetError(
                f"{data_file} ({data_size} bytes) and {index_file} (data ends at byte {end}, "
                f"{sequences} sequences) do not belong together; rebuild the dataset"
            )
        self._data = np.memmap(data_file, mode="r", dtype=self.dtype) if data_size else None

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def _tokens(self, first_sequence: int, end_sequence: int) -> np.ndarray:
        """Tokens of sequences [first, end), which lie back to back in the .bin."""
        count = int(self.sequence_lengths[first_sequence:end_sequence].sum())
        if count == 0:
            return np.empty(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first_sequence]) // self.dtype.itemsize
        return self._data[start : start + count]

    def tokens(self) -> np.ndarray:
        """Every token id of the dataset, documents back to back (a view of the memory map)."""
        return self._tokens(0, self.num_sequences)

    def sequence(self, index: int) -> np.ndarray:
        """Token ids of one sequence (a document, or a sentence)."""
        return self._tokens(index, index + 1)

    def document(self, index: int) -> np.ndarray:
        """Token ids of one document, its sequences concatenated."""
        return self._tokens(
            int(self.document_indices[index]), int(self.document_indices[index + 1])
        )

    def largest_token_id(self, sample: int) -> int:
        """The largest id among the first and the last ``sample`` tokens; -1 without tokens."""
        if self._data is None:
            return -1
        return int(max(self._data[:sample].max(), self._data[-sample:].max()))
