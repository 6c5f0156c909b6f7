"""Progress of a preprocessing run: a bar on a terminal, log lines otherwise."""

import sys
import time
from typing import TextIO

try:
    from tqdm import tqdm

    HAVE_TQDM = True
except ImportError:
    HAVE_TQDM = False


class ProgressReporter:
    """Reports documents/s, MB/s (of JSON input) and tokens/s.

    On a terminal (and with tqdm installed) a bar tracks the input files' bytes on disk; else
    a line is printed every ``log_interval`` documents, like Megatron-LM's.

    Args:
        total_file_bytes: Size of all input files on disk.
        log_interval: Documents between log lines.
        stream: Where to report; standard error by default.
    """

    def __init__(self, total_file_bytes: int, log_interval: int, stream: TextIO | None = None):
        stream = stream or sys.stderr
        self._log_interval = log_interval
        self._stream = stream
        self._start = time.perf_counter()
        self.documents = self.input_bytes = self.tokens = 0
        self._next_log = log_interval
        self._bar = None
        if HAVE_TQDM and stream.isatty():
            self._bar = tqdm(
                total=total_file_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="preprocess",
                file=stream,
                dynamic_ncols=True,
            )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def rates(self) -> str:
        """Throughput so far, e.g. ``"9,800 docs/s, 17.1 MB/s, 3.52M tokens/s"``."""
        seconds = max(self.elapsed, 1e-9)
        return (
            f"{self.documents / seconds:,.0f} docs/s, {self.input_bytes / seconds / 1e6:.1f} "
            f"MB/s, {self.tokens / seconds / 1e6:.2f}M tokens/s"
        )

    def update(self, documents: int, input_bytes: int, tokens: int, file_bytes_done: int) -> None:
        """Adds a block's counts; ``file_bytes_done`` is the on-disk position over all files."""
        self.documents += documents
        self.input_bytes += input_bytes
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(file_bytes_done - self._bar.n)
            self._bar.set_postfix_str(self.rates(), refresh=False)
        elif self.documents >= self._next_log:
            print(f"processed {self.documents:,} documents ({self.rates()})", file=self._stream)
            self._next_log = (self.documents // self._log_interval + 1) * self._log_interval

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
