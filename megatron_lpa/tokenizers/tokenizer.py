"""The one tokenizer interface that preprocessing, datasets and the trainer share."""

from abc import ABC, abstractmethod
from collections import OrderedDict
from itertools import chain
from typing import Sequence

import numpy as np

# megatron-core's GPTDataset treats -1 as "no pad token" (its _PAD_TOKEN_ID), so tokenizers
# without a pad token report it rather than None.
NO_TOKEN = -1


class TokenizerConfigError(ValueError):
    """The tokenizer flags are incomplete or point at nothing usable; the message names the
    flag."""


class Tokenizer(ABC):
    """Text <-> token ids, with the special ids Megatron's pipelines ask for.

    Instances also serve as megatron-core's ``GPTDatasetConfig.tokenizer``: GPTDataset reads
    ``vocab_size``, ``eod`` and ``pad`` and hashes ``unique_identifiers`` into its cache names.

    Args:
        **identifiers: What makes this tokenizer's output unique (model files, options); kept,
            with the class name, in ``unique_identifiers``.
    """

    def __init__(self, **identifiers: object) -> None:
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__)] + [(k, str(v)) for k, v in identifiers.items()]
        )

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, including every special token."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id appended after each document (``--append-eod``)."""

    @property
    def pad(self) -> int:
        """Padding id, or -1 when the vocabulary has none."""
        return NO_TOKEN

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id, or -1 when the vocabulary has none."""
        return NO_TOKEN

    @property
    def eos(self) -> int:
        """End-of-sequence id; the end-of-document id unless a subclass says otherwise."""
        return self.eod

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Returns the token ids of ``text``."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Returns the text of token ids."""

    def token_bytes(self) -> np.ndarray:
        """``[vocab_size]`` int64: how many UTF-8 bytes of text each id stands for (0 for special
        ids), so that a loss in nats per token becomes bits per byte: ``sum(nats) / ln 2 /
        sum(token_bytes[targets])``, comparable across tokenizers. This default decodes each id
        alone; subclasses whose single-id decode drops or invents characters override it."""
        special = {self.eod, self.pad, self.bos, self.eos}
        return np.array(
            [
                0 if i in special else len(self.detokenize([i]).encode("utf-8"))
                for i in range(self.vocab_size)
            ],
            dtype=np.int64,
        )

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Returns the token ids of each text; subclasses batch this for speed."""
        return [self.tokenize(text) for text in texts]

    def tokenize_batch_to_array(
        self, texts: Sequence[str], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes texts into the layout indexed datasets store.

        Args:
            texts: The texts.
            dtype: Integer dtype of the returned token array; must hold every id.

        Returns:
            All token ids back to back (``dtype``), and the number of ids of each text (int64).
        """
        ids = self.tokenize_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        return tokens, lengths
