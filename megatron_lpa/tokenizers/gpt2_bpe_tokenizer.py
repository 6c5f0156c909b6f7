"""GPT-2's byte-level BPE (``vocab.json`` + ``merges.txt``), implemented here so that it needs
no download and no Hugging Face package."""

import json
from functools import lru_cache
from typing import Sequence

import numpy as np

from megatron_lpa.tokenizers.tokenizer import Tokenizer

try:
    import regex

    HAVE_REGEX = True
except ImportError:
    HAVE_REGEX = False

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs and punctuation runs (each with
# an optional leading space), then whitespace.
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
END_OF_TEXT = "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: printable
    Latin-1 bytes map to themselves, the others to code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE; end of document is ``<|endoftext|>``.

    Args:
        vocab_file: ``vocab.json``, token string -> id (``--vocab-file``).
        merge_file: ``merges.txt``, one merge ``"a b"`` per line by priority (``--merge-file``).
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        if not HAVE_REGEX:
            raise ImportError(
                "GPT2BPETokenizer needs the 'regex' package for GPT-2's Unicode pre-tokenizer: "
                "pip install regex"
            )
        super().__init__(vocab_file=vocab_file, merge_file=merge_file)
        with open(vocab_file, encoding="utf-8") as f:
            self._encoder: dict[str, int] = json.load(f)
        self._decoder = {i: token for token, i in self._encoder.items()}
        with open(merge_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
        self._merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_to_char = bytes_to_unicode()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        self._split = regex.compile(GPT2_SPLIT_PATTERN)
        self._word_ids: dict[str, list[int]] = {}
        if END_OF_TEXT not in self._encoder:
            raise ValueError(f"{vocab_file} has no {END_OF_TEXT} token; is it GPT-2's vocab.json?")

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    @property
    def eod(self) -> int:
        return self._encoder[END_OF_TEXT]

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._split.findall(text):
            cached = self._word_ids.get(word)
            if cached is None:
                symbols = "".join(self._byte_to_char[b] for b in word.encode("utf-8"))
                cached = [self._encoder[piece] for piece in self._merge(symbols)]
                if len(self._word_ids) > 1 << 18:
                    self._word_ids.clear()
                self._word_ids[word] = cached
            ids += cached
        return ids

    def _merge(self, symbols: str) -> list[str]:
        """Applies merges to one pre-tokenized word, lowest rank first, until none applies."""
        parts = list(symbols)
        while len(parts) > 1:
            pairs = zip(parts, parts[1:])
            best = min(pairs, key=lambda pair: self._merge_ranks.get(pair, float("inf")))
            if best not in self._merge_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def detokenize(self, ids: Sequence[int]) -> str:
        text = "".join(self._decoder[int(i)] for i in ids)
        return bytes(self._char_to_byte[c] for c in text).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """Each token is a string of bytes: count them (decoding one id alone would turn a partial
        UTF-8 character into a 3-byte replacement character)."""
        lengths = np.array([len(self._decoder[i]) for i in range(self.vocab_size)], dtype=np.int64)
        lengths[self.eod] = 0
        return lengths
