"""Tokenizers behind one interface, built from Megatron-LM's ``--tokenizer-type`` names."""

from megatron_lpa.tokenizers.build import TOKENIZER_TYPES, build_tokenizer
from megatron_lpa.tokenizers.tokenizer import Tokenizer, TokenizerConfigError

__all__ = ["TOKENIZER_TYPES", "Tokenizer", "TokenizerConfigError", "build_tokenizer"]
