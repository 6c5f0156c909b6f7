"""Turns JSON-lines corpora (The Pile's .jsonl.zst shards and the like) into Megatron indexed
datasets, ``{output_prefix}_{json_key}_document.bin/.idx``, with Megatron-LM's flags.

Example:
    python tools/preprocess_data.py --input 'pile/train/*.jsonl.zst' --output-prefix data/pile \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \\
        --append-eod --workers 16
"""

import argparse
import os
import signal
import sys

from megatron_lpa.data.block_encoder import EncoderOptions
from megatron_lpa.data.jsonl_reader import InputError
from megatron_lpa.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from megatron_lpa.tokenizers import TOKENIZER_TYPES, TokenizerConfigError


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's tokenizer flags (those megatron_lpa.tokenizers supports)."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type", required=True, help=f"one of: {', '.join(TOKENIZER_TYPES)}"
    )
    group.add_argument(
        "--tokenizer-model", help="SentencePiece .model, or tokenizer.json (or its directory)"
    )
    group.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument("--vocab-size", type=int, help="number of ids (NullTokenizer)")
    group.add_argument(
        "--legacy-tokenizer",
        action="store_true",
        help="SentencePieceTokenizer as Megatron-LM's legacy tokenizer system has it (adds "
        "<CLS> <SEP> <EOD> <MASK> after the model's pieces; end of document is <EOD>); without "
        "it, as megatron-core's: the model's pieces, end of document is the model's </s>",
    )


def tokenizer_args(args: argparse.Namespace) -> dict:
    """The ``build_tokenizer`` keyword arguments of parsed tokenizer flags."""
    tokenizer_type = args.tokenizer_type
    if tokenizer_type == "SentencePieceTokenizer" and not args.legacy_tokenizer:
        # megatron-core's SentencePieceTokenizer encodes as GPTSentencePieceTokenizer does.
        tokenizer_type = "GPTSentencePieceTokenizer"
    return {
        "tokenizer_type": tokenizer_type,
        "tokenizer_model": args.tokenizer_model,
        "vocab_file": args.vocab_file,
        "merge_file": args.merge_file,
        "vocab_size": args.vocab_size,
    }


# Megatron-LM flags that are not implemented (a trailing "-": every flag with that start), and
# what to do instead.
MEGATRON_LM_ONLY_FLAGS = {
    "--padded-vocab-size": "preprocessing does not pad the vocabulary; drop it (pretrain_gpt.py "
    "pads the embedding itself)",
    "--vocab-extra-ids": "add the sentinel pieces to the SentencePiece model instead "
    "(tools/train_tokenizer.py, or spm_train --user_defined_symbols)",
    "--tokenizer-special-tokens": "put the special tokens in the tokenizer file instead "
    "(SentencePiece user_defined_symbols, or tokenizer.json's added_tokens)",
    "--tokenizer-metadata": "the tokenizer file alone describes the tokenizer here; drop it",
    "--tokenizer-sentencepiece-legacy": "SentencePiece models encode as the sentencepiece "
    "library does; drop it (--legacy-tokenizer is Megatron-LM's other, supported flag)",
    "--tokenizer-hf-": "pass --tokenizer-type HuggingFaceTokenizer --tokenizer-model with a "
    "local tokenizer.json (or its directory)",
    "--trust-remote-code": "only tokenizer.json files are read, no code; pass "
    "--tokenizer-type HuggingFaceTokenizer --tokenizer-model with the tokenizer.json",
    "--tiktoken-": "convert the tiktoken vocabulary to a Hugging Face tokenizer.json, then pass "
    "--tokenizer-type HuggingFaceTokenizer --tokenizer-model with it",
}


def _megatron_lm_only_flag(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    for arg in argv:
        name = arg.split("=", 1)[0]
        for flag, instead in MEGATRON_LM_ONLY_FLAGS.items():
            if name == flag or (flag.endswith("-") and name.startswith(flag)):
                parser.error(f"{name} (Megatron-LM's) is not supported here; {instead}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _megatron_lm_only_flag(parser, sys.argv[1:] if argv is None else argv)
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files or glob patterns: .jsonl, .json (one object per line), .jsonl.zst/.gz/.xz",
    )
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract")
    group.add_argument("--split-sentences", action="store_true", help="one sequence a sentence")
    group.add_argument(
        "--keep-newlines", action="store_true", help="keep newlines between split sentences"
    )
    group.add_argument("--lang", default="english", help="nltk punkt language for splitting")
    group.add_argument(
        "--untrained-sentence-splitter",
        action="store_true",
        help="without nltk's punkt data, split with nltk's untrained Punkt tokenizer (sentences "
        "then differ from Megatron-LM's) instead of stopping",
    )
    group.add_argument(
        "--pile-set-names",
        nargs="+",
        help="keep only lines whose meta.pile_set_name is one of these (e.g. 'Wikipedia (en)')",
    )
    group.add_argument(
        "--exclude-pile-set-names",
        nargs="+",
        default=[],
        help="drop lines whose meta.pile_set_name is one of these",
    )
    group.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip malformed or empty lines and unreadable files, counting and reporting them, "
        "instead of stopping at the first",
    )
    add_tokenizer_args(parser)
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true", help="end each document with <eod>")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="output path without suffix")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing worker processes")
    group.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="accepted with --keep-sequential-samples (workers must be a multiple); the "
        "workers already share the input",
    )
    group.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="documents keep their input order (they always do; Megatron-LM's --partitions "
        "needs this flag for that order)",
    )
    group.add_argument(
        "--log-interval", type=int, default=1000, help="documents between progress lines"
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.partitions < 1 or args.workers % args.partitions:
        parser.error("--workers must be a positive multiple of --partitions")
    if args.partitions > 1 and not args.keep_sequential_samples:
        parser.error(
            "--partitions without --keep-sequential-samples: Megatron-LM then interleaves the "
            "documents across partitions, an order this tool does not write; pass "
            "--keep-sequential-samples (input order, Megatron-LM's order with that flag) or "
            "leave --partitions out (the workers share the input anyway)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    args = parse_args(argv)
    punkt_parameters = None
    if args.split_sentences:
        from megatron_lpa.data.sentence_splitter import find_punkt_parameters, punkt_missing_message

        punkt_parameters = find_punkt_parameters(args.lang)
        if punkt_parameters is None:
            allowed = args.untrained_sentence_splitter
            print(punkt_missing_message(args.lang, allowed), file=sys.stderr)
            if not allowed:
                return 1
    config = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        encoder=EncoderOptions(
            tokenizer_args=tokenizer_args(args),
            json_keys=tuple(args.json_keys),
            append_eod=args.append_eod,
            split_sentences=args.split_sentences,
            keep_newlines=args.keep_newlines,
            punkt_parameters=punkt_parameters,
            pile_set_names=tuple(args.pile_set_names) if args.pile_set_names else None,
            exclude_pile_set_names=tuple(args.exclude_pile_set_names),
        ),
        workers=args.workers,
        skip_bad_lines=args.skip_bad_lines,
        log_interval=args.log_interval,
    )
    try:
        summary = preprocess(config)
    except (InputError, TokenizerConfigError, PreprocessError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    print(summary.report())
    return 0


def _interrupt_this_process_only(signum: int, frame) -> None:
    """SIGINT and SIGTERM: KeyboardInterrupt in the tool's process, which removes its temporary
    files (a plain `kill` cleans up like Ctrl-C does).

    A pool worker is a fork of that process and runs this handler until its initializer replaces
    it; a worker that starts late (one the scheduler has not run yet when the pool is stopped)
    would raise KeyboardInterrupt in its copy of the tool's stack, print the tool's message and
    hang its exit, and the tool's with it. There SIGTERM ends the worker and SIGINT is left to the
    tool, which stops the pool.
    """
    if os.getpid() == _TOOL_PID:
        raise KeyboardInterrupt
    if signum == signal.SIGTERM:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


if __name__ == "__main__":
    _TOOL_PID = os.getpid()
    signal.signal(signal.SIGINT, _interrupt_this_process_only)
    signal.signal(signal.SIGTERM, _interrupt_this_process_only)
    sys.exit(main())
