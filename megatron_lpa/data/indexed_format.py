"""The on-disk layout of Megatron's indexed datasets, shared by our writer and reader.

A dataset is a pair ``{prefix}.bin`` / ``{prefix}.idx``. The ``.bin`` holds token ids back to
back in one integer dtype. The ``.idx`` is, little-endian:

    magic ``MMIDIDX\\x00\\x00`` | u64 version = 1 | u8 dtype code
    u64 S = number of sequences | u64 D = number of documents + 1
    int32[S] sequence lengths (tokens)
    int64[S] sequence pointers (byte offset of each sequence in the .bin)
    int64[D] document indices: 0, then the sequence count at the end of each document

A sequence is a document, or a sentence with ``--split-sentences``. This is what megatron-core's
``IndexedDatasetBuilder`` writes and ``IndexedDataset`` reads (megatron/core/datasets/
indexed_dataset.py), byte for byte.
"""

import struct

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic, version, dtype code, sequence count, document count + 1
INDEX_HEADER = struct.Struct("<9sQBQQ")

# megatron.core.datasets.indexed_dataset.DType
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def optimal_token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with room to spare, else int32 (megatron-core's
    ``DType.optimal_dtype``)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def bin_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def idx_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def dataset_prefix(output_prefix: str, json_key: str, split_sentences: bool) -> str:
    """Megatron-LM's output name: ``{output_prefix}_{json_key}_{document|sentence}``."""
    return f"{output_prefix}_{json_key}_{'sentence' if split_sentences else 'document'}"
