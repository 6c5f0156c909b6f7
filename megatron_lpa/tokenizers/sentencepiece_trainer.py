"""Trains SentencePiece models from documents (no pretrained tokenizer can be downloaded
offline, so the quickstart and the tests train their own)."""

import os
from typing import Iterable, Iterator

import sentencepiece


def _lines(documents: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on "sentences"; a document's non-blank lines serve as those."""
    for document in documents:
        for line in document.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(
    documents: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    input_sentence_size: int = 5_000_000,
    num_threads: int | None = None,
) -> str:
    """Trains a model and writes ``{model_prefix}.model`` and ``.vocab``.

    The files are written under temporary names and renamed when training succeeds, so an
    interrupted run leaves no model that looks finished.

    Args:
        documents: Document texts.
        model_prefix: Output path without extension.
        vocab_size: Number of pieces, special tokens included.
        model_type: ``bpe`` or ``unigram`` (SentencePiece's ``model_type``).
        character_coverage: Fraction of characters the pieces must cover; the rest become
            bytes (``byte_fallback``) or ``<unk>``.
        byte_fallback: Encode characters outside the vocabulary as UTF-8 bytes.
        input_sentence_size: Lines sampled for training at most (bounds memory).
        num_threads: Training threads; all CPUs when None.

    Returns:
        The path of the ``.model`` file.
    """
    partial_prefix = f"{model_prefix}.partial"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_lines(documents),
        model_prefix=partial_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,
        num_threads=num_threads or os.cpu_count(),
        minloglevel=2,
    )
    os.replace(f"{partial_prefix}.vocab", f"{model_prefix}.vocab")
    os.replace(f"{partial_prefix}.model", f"{model_prefix}.model")
    return f"{model_prefix}.model"
