"""NullTokenizer: text is already space-separated token ids (tests and synthetic data)."""

from typing import Sequence

from megatron_lpa.tokenizers.tokenizer import Tokenizer


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: ``"5 17 3"`` -> ``[5, 17, 3]``; the end-of-document id is
    ``vocab_size`` as given, so the reported vocabulary is one larger.

    Args:
        vocab_size: Number of ordinary ids (``--vocab-size``).
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__(vocab_size=vocab_size)
        self._eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._eod + 1

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        ids = [int(token) for token in text.split()]
        if any(not 0 <= i < self._eod for i in ids):
            raise ValueError(f"NullTokenizer ids must lie in [0, {self._eod}) (--vocab-size)")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
