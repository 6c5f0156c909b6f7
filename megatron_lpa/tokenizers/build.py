"""build_tokenizer: Megatron-LM's ``--tokenizer-type`` names -> a Tokenizer."""

import os

from megatron_lpa.tokenizers.tokenizer import Tokenizer, TokenizerConfigError

# --tokenizer-type -> the flags it needs.
TOKENIZER_TYPES = {
    "GPT2BPETokenizer": ("--vocab-file", "--merge-file"),
    "SentencePieceTokenizer": ("--tokenizer-model",),
    "GPTSentencePieceTokenizer": ("--tokenizer-model",),
    "Llama2Tokenizer": ("--tokenizer-model",),
    "HuggingFaceTokenizer": ("--tokenizer-model",),
    "NullTokenizer": ("--vocab-size",),
}

_WHAT_TO_PASS = {
    "--vocab-file": "GPT-2's vocab.json",
    "--merge-file": "GPT-2's merges.txt",
    "--tokenizer-model": "the model file",
    "--vocab-size": "the number of token ids",
}

_MODEL_HINTS = {
    "SentencePieceTokenizer": "a SentencePiece .model file (tools/train_tokenizer.py trains one)",
    "GPTSentencePieceTokenizer": (
        "a SentencePiece .model file (tools/train_tokenizer.py trains one)"
    ),
    "Llama2Tokenizer": "LLaMA-2's tokenizer.model",
    "HuggingFaceTokenizer": "a tokenizer.json file or the directory holding it",
}


# Megatron-LM's tokenizer types that are not implemented, and what to pass instead.
_USE_HF = "pass --tokenizer-type HuggingFaceTokenizer and --tokenizer-model {}"
MEGATRON_LM_ONLY_TYPES = {
    "BertWordPieceLowerCase": _USE_HF.format("with the BERT model's (uncased) tokenizer.json"),
    "BertWordPieceCase": _USE_HF.format("with the BERT model's (cased) tokenizer.json"),
    "TikTokenizer": "convert the tiktoken vocabulary to a Hugging Face tokenizer.json, then "
    + _USE_HF.format("with it"),
}


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """Builds the tokenizer Megatron-LM builds for the same flags.

    Args:
        tokenizer_type: ``--tokenizer-type``, one of ``TOKENIZER_TYPES``.
        tokenizer_model: ``--tokenizer-model``: SentencePiece model, or tokenizer.json (or its
            directory) for HuggingFaceTokenizer.
        vocab_file: ``--vocab-file`` (GPT2BPETokenizer's vocab.json).
        merge_file: ``--merge-file`` (GPT2BPETokenizer's merges.txt).
        vocab_size: ``--vocab-size`` (NullTokenizer).

    Raises:
        TokenizerConfigError: Unknown type, a missing flag, or a file that does not exist or
            cannot be loaded.
    """
    if tokenizer_type in MEGATRON_LM_ONLY_TYPES:
        raise TokenizerConfigError(
            f"--tokenizer-type {tokenizer_type} (Megatron-LM's) is not supported here; "
            f"{MEGATRON_LM_ONLY_TYPES[tokenizer_type]}"
        )
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerConfigError(
            f"unknown --tokenizer-type {tokenizer_type!r}; pass one of: "
            f"{', '.join(TOKENIZER_TYPES)}"
        )
    values = {
        "--tokenizer-model": tokenizer_model,
        "--vocab-file": vocab_file,
        "--merge-file": merge_file,
        "--vocab-size": vocab_size,
    }
    for flag in TOKENIZER_TYPES[tokenizer_type]:
        what = _MODEL_HINTS.get(tokenizer_type, _WHAT_TO_PASS[flag])
        if values[flag] is None:
            raise TokenizerConfigError(f"--tokenizer-type {tokenizer_type} needs {flag}: {what}")
        if flag != "--vocab-size" and not os.path.exists(values[flag]):
            raise TokenizerConfigError(f"{flag} {values[flag]} does not exist; pass {what}")

    if tokenizer_type == "GPT2BPETokenizer":
        from megatron_lpa.tokenizers.gpt2_bpe_tokenizer import GPT2BPETokenizer

        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        from megatron_lpa.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        from megatron_lpa.tokenizers.null_tokenizer import NullTokenizer

        return NullTokenizer(vocab_size)
    from megatron_lpa.tokenizers import sentencepiece_tokenizer

    return getattr(sentencepiece_tokenizer, tokenizer_type)(tokenizer_model)
