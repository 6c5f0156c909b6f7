"""Hugging Face ``tokenizer.json`` files, through the ``tokenizers`` package (optional)."""

import json
import os
from typing import Sequence

from megatron_lpa.tokenizers.tokenizer import NO_TOKEN, Tokenizer, TokenizerConfigError

try:
    import tokenizers

    HAVE_TOKENIZERS = True
except ImportError:
    HAVE_TOKENIZERS = False

# Used when no tokenizer_config.json names the end-of-sequence token.
END_OF_DOCUMENT_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def _special_token(config: dict, key: str) -> str | None:
    """A token from tokenizer_config.json, which holds either a string or {"content": ...}."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizer.json``; special tokens come from the ``tokenizer_config.json`` beside it.

    Encoding adds the tokenizer's own special tokens (its post-processor, e.g. LLaMA's ``<s>``),
    as ``transformers`` does by default and Megatron-LM's HuggingFaceTokenizer therefore does.

    Args:
        path: ``tokenizer.json`` or a directory holding it (``--tokenizer-model``).
    """

    def __init__(self, path: str) -> None:
        if not HAVE_TOKENIZERS:
            raise ImportError(
                "HuggingFaceTokenizer needs the 'tokenizers' package: pip install tokenizers"
            )
        tokenizer_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        super().__init__(tokenizer_file=tokenizer_file)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as error:  # the tokenizers package raises plain Exceptions
            raise TokenizerConfigError(
                f"--tokenizer-model {tokenizer_file} is not a Hugging Face tokenizer.json ({error})"
            ) from error
        config_file = os.path.join(os.path.dirname(tokenizer_file), "tokenizer_config.json")
        config = {}
        if os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        eod_token = _special_token(config, "eos_token")
        if eod_token is None:
            known = [
                t for t in END_OF_DOCUMENT_CANDIDATES if self._tokenizer.token_to_id(t) is not None
            ]
            eod_token = known[0] if known else None
        if eod_token is None or self._tokenizer.token_to_id(eod_token) is None:
            raise TokenizerConfigError(
                f"cannot tell the end-of-document token of {tokenizer_file}: put a "
                f'tokenizer_config.json with "eos_token" beside it'
            )
        self._eod = self._tokenizer.token_to_id(eod_token)
        self._pad = self._token_id(_special_token(config, "pad_token"))
        self._bos = self._token_id(_special_token(config, "bos_token"))

    def _token_id(self, token: str | None) -> int:
        token_id = None if token is None else self._tokenizer.token_to_id(token)
        return NO_TOKEN if token_id is None else token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int:
        return self._bos

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])
