"""Trains a SentencePiece tokenizer on the same inputs tools/preprocess_data.py reads.

Example:
    python tools/train_tokenizer.py --input 'data/*.jsonl.zst' --model-prefix tok/wiki32k \\
        --vocab-size 32000 --max-documents 200000
    # then: tools/preprocess_data.py --tokenizer-type GPTSentencePieceTokenizer \\
    #           --tokenizer-model tok/wiki32k.model ...
"""

import argparse
import os
import sys
from itertools import islice

from megatron_lpa.data.json_documents import BadLineError, JsonDocumentParser, iter_documents
from megatron_lpa.data.jsonl_reader import InputError, expand_input_paths
from megatron_lpa.tokenizers.sentencepiece_trainer import train_sentencepiece


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="files or glob patterns (.jsonl[.zst|.gz|.xz])"
    )
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding text")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="map rare characters to <unk> instead of UTF-8 byte tokens",
    )
    parser.add_argument("--max-documents", type=int, help="train on the first N documents only")
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=5_000_000,
        help="lines sampled for training at most (bounds memory)",
    )
    parser.add_argument("--num-threads", type=int, help="training threads (default: all CPUs)")
    parser.add_argument(
        "--skip-bad-lines", action="store_true", help="skip bad lines instead of stopping"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the tool; returns the exit status."""
    args = parse_args(argv)
    bad_lines = [] if args.skip_bad_lines else None
    try:
        parser = JsonDocumentParser(args.json_keys)
        documents = iter_documents(expand_input_paths(args.input), parser, bad_lines)
        texts = (text for document in documents for text in document)
        if args.max_documents is not None:
            texts = islice(texts, args.max_documents * len(args.json_keys))
        os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
        model_file = train_sentencepiece(
            texts,
            args.model_prefix,
            args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            input_sentence_size=args.input_sentence_size,
            num_threads=args.num_threads,
        )
    except (InputError, BadLineError, RuntimeError) as error:
        # SentencePiece reports bad settings (e.g. a vocabulary too large for the text) as
        # RuntimeError.
        print(f"error: {error}", file=sys.stderr)
        return 1
    if bad_lines:
        print(f"skipped {len(bad_lines)} bad lines, first: {bad_lines[0]}", file=sys.stderr)
    print(f"wrote {model_file} (--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
