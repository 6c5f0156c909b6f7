"""The preprocessing pipeline: JSON-lines files -> one indexed dataset per JSON key.

The parent process streams the input as blocks of whole lines to a pool of workers; each
worker parses and tokenizes a whole block at once (BlockEncoder) and sends back flat token
arrays. The parent appends them in input order, so the output does not depend on the number
of workers, and it keeps only a few blocks in flight, so memory does not grow with the input.
"""

import multiprocessing
import os
import signal
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TextIO

from megatron_lpa.data.block_encoder import BlockEncoder, EncodedBlock, EncoderOptions
from megatron_lpa.data.indexed_format import dataset_prefix, optimal_token_dtype
from megatron_lpa.data.indexed_writer import IndexedDatasetWriter
from megatron_lpa.data.json_documents import BadLine
from megatron_lpa.data.jsonl_reader import LineBlock, expand_input_paths, iter_line_blocks
from megatron_lpa.data.progress import ProgressReporter
from megatron_lpa.platform.parent_watch import exit_with_parent
from megatron_lpa.tokenizers import build_tokenizer

BAD_LINE_EXAMPLES = 10


class PreprocessError(Exception):
    """The run stopped on bad input, or produced nothing; nothing was written."""


@dataclass
class PreprocessConfig:
    """A preprocessing run.

    Attributes:
        inputs: Input files or glob patterns (``--input``).
        output_prefix: Output path prefix (``--output-prefix``).
        encoder: What to extract and how to tokenize it.
        workers: Worker processes (``--workers``).
        skip_bad_lines: Count and report bad lines instead of stopping at the first.
        log_interval: Documents between progress lines when not on a terminal.
    """

    inputs: list[str]
    output_prefix: str
    encoder: EncoderOptions
    workers: int = 1
    skip_bad_lines: bool = False
    log_interval: int = 1000


@dataclass
class PreprocessSummary:
    """What a run wrote and skipped."""

    output_prefixes: list[str]
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    rates: str = ""
    filtered_lines: int = 0
    bad_lines: int = 0
    bad_line_examples: list[BadLine] = field(default_factory=list)

    def report(self) -> str:
        """A few lines for the end of a run."""
        lines = [
            f"documents: {self.documents:,}   tokens: {self.tokens:,}   "
            f"input: {self.input_bytes / 1e6:,.1f} MB   time: {self.seconds:.2f} s ({self.rates})",
            f"skipped lines: {self.bad_lines:,} bad, {self.filtered_lines:,} filtered out by "
            "pile set name",
        ]
        lines += [f"  skipped {bad}" for bad in self.bad_line_examples]
        if self.bad_lines > len(self.bad_line_examples):
            lines.append(f"  ... and {self.bad_lines - len(self.bad_line_examples):,} more")
        lines += [f"wrote {prefix}.bin/.idx" for prefix in self.output_prefixes]
        return "\n".join(lines)


_worker_encoder: BlockEncoder | None = None


def _start_worker(options: EncoderOptions, parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_with_parent(parent_pid)
    global _worker_encoder
    _worker_encoder = BlockEncoder(options)


def _encode_block(block: LineBlock) -> EncodedBlock:
    return _worker_encoder.encode(block)


def preprocess(
    config: PreprocessConfig, progress_stream: TextIO | None = None
) -> PreprocessSummary:
    """Runs the pipeline, reporting progress to ``progress_stream`` (standard error by default).

    Raises:
        InputError: An input path matches no file.
        TokenizerConfigError: The tokenizer flags are incomplete or wrong.
        PreprocessError: A bad line or unreadable file without ``skip_bad_lines``, or no
            documents at all. Nothing is written then.
    """
    paths = expand_input_paths(config.inputs)
    options = config.encoder
    dtype = optimal_token_dtype(build_tokenizer(**options.tokenizer_args).vocab_size)
    prefixes = [
        dataset_prefix(config.output_prefix, key, options.split_sentences)
        for key in options.json_keys
    ]
    file_starts, total = {}, 0
    for path in paths:
        file_starts[path], total = total, total + os.path.getsize(path)
    summary = PreprocessSummary(prefixes)
    progress = ProgressReporter(total, config.log_interval, progress_stream)

    def write(encoded: EncodedBlock) -> None:
        for bad in encoded.bad_lines:
            if not config.skip_bad_lines:
                raise PreprocessError(
                    f"{bad}\nstopped; nothing was written. Fix the input, or pass "
                    "--skip-bad-lines to skip such lines and count them."
                )
            summary.bad_lines += 1
            if len(summary.bad_line_examples) < BAD_LINE_EXAMPLES:
                summary.bad_line_examples.append(bad)
        summary.filtered_lines += encoded.filtered_lines
        for writer, key in zip(writers, encoded.keys):
            writer.add_documents(key.tokens, key.sequence_lengths, key.sequences_per_document)
        file_bytes_done = file_starts[encoded.path] + encoded.file_offset
        progress.update(encoded.documents, encoded.input_bytes, encoded.tokens, file_bytes_done)

    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with ExitStack() as stack:
        stack.callback(progress.close)
        writers = [stack.enter_context(IndexedDatasetWriter(p, dtype)) for p in prefixes]
        # The pool stops before the first file is published: an interrupt while it stops
        # leaves no output, as the tool then says.
        with context.Pool(config.workers, _start_worker, (options, os.getpid())) as pool:
            pending = deque()
            for block in iter_line_blocks(paths):
                pending.append(pool.apply_async(_encode_block, (block,)))
                while len(pending) > 2 * config.workers:
                    write(pending.popleft().get())
            while pending:
                write(pending.popleft().get())
        if progress.documents == 0:
            raise PreprocessError(
                f"no documents to write ({summary.filtered_lines:,} lines filtered out by pile "
                f"set name, {summary.bad_lines:,} bad lines skipped); check --input, "
                "--json-keys and the pile set name filters"
            )
        for writer in writers:
            writer.finalize()
    summary.documents, summary.tokens = progress.documents, progress.tokens
    summary.input_bytes, summary.seconds = progress.input_bytes, progress.elapsed
    summary.rates = progress.rates()
    return summary
