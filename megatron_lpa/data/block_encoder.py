"""Turns a block of JSON lines into token arrays ready to append to indexed datasets.

This is the work each preprocessing worker does: parse, optionally split sentences, tokenize
the whole block in one batch, and return flat numpy arrays, so that the parent only appends
bytes to files.
"""

from dataclasses import dataclass, field

import numpy as np

from megatron_lpa.data.indexed_format import optimal_token_dtype
from megatron_lpa.data.json_documents import BadLine, JsonDocumentParser
from megatron_lpa.data.jsonl_reader import LineBlock
from megatron_lpa.tokenizers import build_tokenizer


@dataclass(frozen=True)
class EncoderOptions:
    """Everything a worker needs to encode blocks (sent to each worker once).

    Attributes:
        tokenizer_args: Keyword arguments of ``build_tokenizer``.
        json_keys: Keys whose texts become datasets, one dataset each.
        append_eod: Append the end-of-document id to each document.
        split_sentences: One sequence per sentence instead of per document.
        keep_newlines: Keep the whitespace after sentences when splitting.
        punkt_parameters: Trained Punkt model for splitting; None for the untrained one.
        pile_set_names: Keep only these ``meta.pile_set_name`` values (None keeps all).
        exclude_pile_set_names: Drop these ``meta.pile_set_name`` values.
    """

    tokenizer_args: dict
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    punkt_parameters: object = None
    pile_set_names: tuple[str, ...] | None = None
    exclude_pile_set_names: tuple[str, ...] = ()


@dataclass
class EncodedKey:
    """The documents of one block for one JSON key, in indexed-dataset layout, and the
    documents that cannot be kept (index -> reason)."""

    tokens: np.ndarray
    sequence_lengths: np.ndarray  # int32
    sequences_per_document: np.ndarray  # int64
    problems: dict[int, str] = field(default_factory=dict)


@dataclass
class EncodedBlock:
    """A block's documents (one EncodedKey per JSON key) and what happened to its lines."""

    path: str
    file_offset: int
    input_bytes: int
    documents: int = 0
    keys: list[EncodedKey] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    filtered_lines: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(key.tokens) for key in self.keys)


class BlockEncoder:
    """Encodes blocks of JSON lines with one tokenizer (built once per worker).

    Args:
        options: What to extract and how to tokenize it.
    """

    def __init__(self, options: EncoderOptions) -> None:
        self._options = options
        self._tokenizer = build_tokenizer(**options.tokenizer_args)
        self._dtype = optimal_token_dtype(self._tokenizer.vocab_size)
        self._parser = JsonDocumentParser(
            options.json_keys, options.pile_set_names, options.exclude_pile_set_names
        )
        self._splitter = None
        if options.split_sentences:
            # nltk takes most of a second to import; only sentence splitting needs it.
            from megatron_lpa.data.sentence_splitter import SentenceSplitter

            self._splitter = SentenceSplitter(options.punkt_parameters, options.keep_newlines)

    def encode(self, block: LineBlock) -> EncodedBlock:
        """Encodes every document of the block; bad and filtered lines are reported, not
        raised, so that the caller decides whether to stop."""
        parsed = self._parser.parse_block(block)
        result = EncodedBlock(block.path, block.file_offset, len(block.data))
        result.bad_lines, result.filtered_lines = parsed.bad_lines, parsed.filtered_lines
        keys = self._options.json_keys
        result.keys = [
            self._tokenize(key, [texts[k] for texts in parsed.documents])
            for k, key in enumerate(keys)
        ]
        problems: dict[int, str] = {}
        for encoded in result.keys:
            for document, reason in encoded.problems.items():
                problems.setdefault(document, reason)
        for document, reason in problems.items():
            result.bad_lines.append(BadLine(block.path, parsed.line_numbers[document], reason))
        keep = np.ones(len(parsed.documents), dtype=bool)
        keep[list(problems)] = False
        result.bad_lines.sort(key=lambda bad: bad.line_number)
        result.keys = [self._finish(encoded, keep) for encoded in result.keys]
        result.documents = int(keep.sum())
        return result

    def _tokenize(self, key: str, texts: list[str]) -> EncodedKey:
        """Tokenizes one key's texts. Sequences without tokens are dropped, as in Megatron, so
        a document without tokens has no sequences (and is a problem)."""
        if self._splitter is None:
            pieces, document_of_piece = texts, np.arange(len(texts))
        else:
            sentences = [self._splitter(text) for text in texts]
            pieces = [sentence for document in sentences for sentence in document]
            counts = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
            document_of_piece = np.repeat(np.arange(len(texts)), counts)
        problems = {}
        try:
            tokens, lengths = self._tokenizer.tokenize_batch_to_array(pieces, self._dtype)
        except ValueError:
            # A text the tokenizer rejects (NullTokenizer given words, say): find it.
            tokens, lengths = [], []
            for piece, document in zip(pieces, document_of_piece):
                try:
                    piece_tokens, piece_lengths = self._tokenizer.tokenize_batch_to_array(
                        [piece], self._dtype
                    )
                except ValueError as error:
                    problems[int(document)] = f"cannot tokenize {key!r}: {error}"
                    piece_tokens, piece_lengths = np.empty(0, self._dtype), np.zeros(1, np.int64)
                tokens.append(piece_tokens)
                lengths.append(piece_lengths)
            tokens, lengths = np.concatenate(tokens), np.concatenate(lengths)
        nonempty = lengths > 0
        sequences = np.bincount(document_of_piece[nonempty], minlength=len(texts))
        for document in np.flatnonzero(sequences == 0):
            problems.setdefault(int(document), f"empty document: {key!r} has no tokens")
        return EncodedKey(tokens, lengths[nonempty], sequences, problems)

    def _finish(self, encoded: EncodedKey, keep: np.ndarray) -> EncodedKey:
        """Drops the documents not kept and appends the end-of-document ids."""
        tokens, lengths, sequences = (
            encoded.tokens,
            encoded.sequence_lengths,
            encoded.sequences_per_document,
        )
        if not keep.all():
            kept_sequences = np.repeat(keep, sequences)
            tokens = tokens[np.repeat(kept_sequences, lengths)]
            lengths, sequences = lengths[kept_sequences], sequences[keep]
        if self._options.append_eod and len(sequences):
            last_sequence = np.cumsum(sequences) - 1
            document_ends = np.cumsum(lengths)[last_sequence]
            tokens = np.insert(tokens, document_ends, self._tokenizer.eod)
            lengths = lengths.copy()
            lengths[last_sequence] += 1
        return EncodedKey(tokens, lengths.astype(np.int32), sequences)
