"""SentencePiece tokenizers with the ids and special tokens of Megatron-LM's three SP types."""

import re
from typing import Sequence

import numpy as np
import sentencepiece

from megatron_lpa.tokenizers.sentencepiece_word_cache import SentencePieceWordCache
from megatron_lpa.tokenizers.tokenizer import Tokenizer, TokenizerConfigError


class GPTSentencePieceTokenizer(Tokenizer):
    """A SentencePiece model as it is: its own vocabulary, end of document = its ``</s>``.

    Args:
        model_file: A SentencePiece ``.model`` file (``--tokenizer-model``).
    """

    def __init__(self, model_file: str, **identifiers: object) -> None:
        super().__init__(model_file=model_file, **identifiers)
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as error:
            raise TokenizerConfigError(
                f"--tokenizer-model {model_file} is not a SentencePiece model ({error})"
            ) from error
        self._word_cache = SentencePieceWordCache(self._processor)

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def eod(self) -> int:
        return self._processor.eos_id()

    @property
    def pad(self) -> int:
        return self._processor.pad_id()

    @property
    def bos(self) -> int:
        return self._processor.bos_id()

    def tokenize(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._processor.encode(list(texts), num_threads=1)

    def tokenize_batch_to_array(
        self, texts: Sequence[str], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        tokens, lengths = self._word_cache.encode(texts)
        return tokens.astype(dtype, copy=False), lengths

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """A piece's text with its word-start mark as the space it stands for (decoding one id
        alone drops that space); a byte-fallback piece is one byte; control and unknown ids none.
        Ids past the SentencePiece model (a subclass's extra ids) are special: none."""
        sp = self._processor
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            lengths[i] = (
                1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
            )
        return lengths


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """LLaMA-2's ``tokenizer.model``: like GPTSentencePieceTokenizer, but each text starts
    with ``<s>``, as Megatron-LM's Llama2Tokenizer does for text completion."""

    def tokenize(self, text: str) -> list[int]:
        return [self.bos] + super().tokenize(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.bos] + ids for ids in super().tokenize_batch(texts)]

    def tokenize_batch_to_array(
        self, texts: Sequence[str], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        tokens, lengths = super().tokenize_batch_to_array(texts, dtype)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        return np.insert(tokens, starts, self.bos), lengths + 1


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """Megatron-LM's original SentencePieceTokenizer.

    Adds ``<CLS> <SEP> <EOD> <MASK>``, the pad/bos/eos pieces (``<PAD>``, ``<BOS>``,
    ``<EOS>`` when the model has none) and ``<extra_id_N>`` to the model's vocabulary, with
    new ids after its pieces; end of document is ``<EOD>``. These strings in a text become
    their ids.

    Args:
        model_file: A SentencePiece ``.model`` file (``--tokenizer-model``).
        vocab_extra_ids: Number of ``<extra_id_N>`` sentinel tokens to add.
    """

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        super().__init__(model_file, vocab_extra_ids=vocab_extra_ids)
        processor = self._processor
        self._vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}

        def piece_or(piece_id: int, default: str) -> str:
            in_range = 0 <= piece_id < processor.get_piece_size()
            return processor.id_to_piece(piece_id) if in_range else default

        names = ["<CLS>", "<SEP>", "<EOD>", "<MASK>"]
        names += [piece_or(processor.pad_id(), "<PAD>"), piece_or(processor.bos_id(), "<BOS>")]
        names += [piece_or(processor.eos_id(), "<EOS>")]
        names += [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        # Insertion order decides between specials found at the same place, as in Megatron.
        self._special_ids: dict[str, int] = {}
        for name in names:
            self._special_ids[name] = self._vocab.setdefault(name, len(self._vocab))
        self._special_names = {i: name for name, i in self._special_ids.items()}
        self._special_pattern = re.compile("|".join(map(re.escape, self._special_ids)))
        self._pad_name, self._bos_name, self._eos_name = names[4:7]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eod(self) -> int:
        return self._special_ids["<EOD>"]

    @property
    def pad(self) -> int:
        return self._special_ids[self._pad_name]

    @property
    def bos(self) -> int:
        return self._special_ids[self._bos_name]

    @property
    def eos(self) -> int:
        return self._special_ids[self._eos_name]

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._special_pattern.finditer(text):
            ids += self._processor.encode(text[start : match.start()])
            ids.append(self._special_ids[match.group()])
            start = match.end()
        return ids + self._processor.encode(text[start:])

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(text) for text in texts]

    def tokenize_batch_to_array(
        self, texts: Sequence[str], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        if any(map(self._special_pattern.search, texts)):
            # Rare: split around the special tokens, text by text.
            return Tokenizer.tokenize_batch_to_array(self, texts, dtype)
        return super().tokenize_batch_to_array(texts, dtype)

    def detokenize(self, ids: Sequence[int]) -> str:
        text, ordinary = "", []
        for token_id in map(int, ids):
            if token_id in self._special_names:
                text += self._processor.decode(ordinary) + f" {self._special_names[token_id]} "
                ordinary = []
            else:
                ordinary.append(token_id)
        return text + self._processor.decode(ordinary)
