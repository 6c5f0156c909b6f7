"""Exact, memoized batch encoding for SentencePiece BPE models.

SentencePiece's BPE spends about 250 ns per character on every document, although a corpus
repeats the same words over and over. For most models a document's encoding is the
concatenation of the encodings of its words, so each distinct word needs encoding once:

- encoding is ``BPE(normalize(text))``, and a normalized text is words joined by the
  whitespace mark U+2581, each word starting with it;
- BPE only ever merges two symbols into a piece of the vocabulary, so when no piece has the
  mark right after another character, no merge crosses into the next word and the words are
  encoded independently;
- ``encode(word)`` equals ``BPE("\u2581" + word)`` exactly when ``normalize(word)`` is that
  string, which is checked for every word before it is cached.

Where a condition does not hold (another model type, a vocabulary with pieces spanning words,
a word normalization changes, runs of whitespace the normalizer keeps), the affected
documents go through ``SentencePieceProcessor.encode`` itself, so the ids are always the ones
SentencePiece gives.
"""

import re
from itertools import chain
from operator import itemgetter
from typing import Iterator, Sequence

import numpy as np
import sentencepiece

WHITESPACE_MARK = "\u2581"
_BPE_MODEL_TYPE = 2  # sentencepiece_model.proto: TrainerSpec.ModelType.BPE
_MARK_AFTER_CHARACTER = re.compile(f"[^{WHITESPACE_MARK}]{WHITESPACE_MARK}")


def _read_varint(buffer: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _protobuf_fields(buffer: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yields (field number, value) of a serialized protobuf message, top level only."""
    position = 0
    while position < len(buffer):
        key, position = _read_varint(buffer, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _read_varint(buffer, position)
        elif wire_type == 2:
            size, position = _read_varint(buffer, position)
            value, position = buffer[position : position + size], position + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, position = buffer[position : position + size], position + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield field, value


def sentencepiece_model_type(processor: sentencepiece.SentencePieceProcessor) -> int:
    """Returns ``TrainerSpec.model_type`` of a loaded model (1 unigram, 2 BPE, 3 word, 4 char).

    Read from the serialized ModelProto (field 2, trainer_spec; its field 3, model_type) so
    that no protobuf package is needed.
    """
    model_type = 1  # the proto's default
    for field, value in _protobuf_fields(processor.serialized_model_proto()):
        if field == 2:
            for spec_field, spec_value in _protobuf_fields(value):
                if spec_field == 3:
                    model_type = spec_value
    return model_type


def word_cache_is_exact(processor: sentencepiece.SentencePieceProcessor) -> bool:
    """Whether encoding word by word gives exactly ``processor.encode``'s ids (module doc)."""
    if sentencepiece_model_type(processor) != _BPE_MODEL_TYPE:
        return False
    # A leading mark on every normalized text, so every word is "mark + characters".
    if processor.normalize("a") != WHITESPACE_MARK + "a":
        return False
    # Unknown characters in a row come out as one merged <unk>; a known mark between words
    # keeps that merging inside a word.
    if processor.piece_to_id(WHITESPACE_MARK) == processor.unk_id():
        return False
    pieces = map(processor.id_to_piece, range(processor.get_piece_size()))
    return not any(map(_MARK_AFTER_CHARACTER.search, pieces))


class SentencePieceWordCache:
    """Encodes batches of texts exactly as ``processor.encode`` does, memoizing words.

    Args:
        processor: A loaded SentencePiece model.
        max_words: Cached words kept at most; the cache is emptied when it grows past this,
            which bounds memory to about 200 bytes a word.
    """

    def __init__(
        self, processor: sentencepiece.SentencePieceProcessor, max_words: int = 1 << 19
    ) -> None:
        self._processor = processor
        self._max_words = max_words
        self.is_exact = word_cache_is_exact(processor)
        self.dtype = np.dtype(np.uint16 if processor.get_piece_size() <= 1 << 16 else np.int32)
        # word (without its leading mark) -> encoding as bytes of self.dtype, or None when
        # the word cannot be encoded alone (its normalization is not itself).
        self._words: dict[str, bytes | None] = {}

    def __len__(self) -> int:
        """Number of words cached."""
        return len(self._words)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts.

        Returns:
            All token ids back to back (``self.dtype``) and the number of ids of each text.
        """
        if not self.is_exact:
            return self._encode_directly(list(texts))
        if len(self._words) > self._max_words:
            self._words.clear()
        words_per_text = [text.split(WHITESPACE_MARK) for text in self._processor.normalize(texts)]
        self._add_words(words_per_text)
        encoded: list[bytes | None] = []
        for words in words_per_text:
            words = words[1:]  # the first is the empty text before the leading mark
            try:
                # A word cached as None, or an empty word (two marks in a row, never cached),
                # makes this raise. itemgetter looks many words up in one call.
                found = (
                    itemgetter(*words)(self._words)
                    if len(words) > 1
                    else map(self._words.__getitem__, words)
                )
                encoded.append(b"".join(found))
            except (TypeError, KeyError):
                encoded.append(None)
        fallback = [i for i, item in enumerate(encoded) if item is None]
        if fallback:
            tokens, lengths = self._encode_directly([texts[i] for i in fallback])
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for n, i in enumerate(fallback):
                encoded[i] = tokens[offsets[n] : offsets[n + 1]].tobytes()
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return np.frombuffer(b"".join(encoded), dtype=self.dtype), lengths // self.dtype.itemsize

    def _add_words(self, words_per_text: list[list[str]]) -> None:
        """Encodes and caches the words not cached yet."""
        seen: set[str] = set()
        for words in words_per_text:
            seen.update(words)
        missing = seen.difference(self._words)  # a C loop over the batch's distinct words
        missing.discard("")
        if not missing:
            return
        words = list(missing)
        tokens, lengths = self._encode_directly(words)
        data = tokens.tobytes()
        ends = (np.cumsum(lengths) * self.dtype.itemsize).tolist()
        starts = [0] + ends[:-1]
        normalized = self._processor.normalize(words)
        for word, word_normalized, start, end in zip(words, normalized, starts, ends):
            exact = word_normalized == WHITESPACE_MARK + word
            self._words[word] = data[start:end] if exact else None

    def _encode_directly(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self._processor.encode(texts, num_threads=1)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return tokens, lengths
