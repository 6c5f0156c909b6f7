"""Configuration errors said once, by rank 0, ending every rank cleanly with exit status 2.

Every rank parses and validates the same flags, so every rank fails alike; unchecked, each printed
the message and torchrun's report of the failed ranks then buried it. Here rank 0 alone prints it
(argparse's own messages on the other ranks are silenced), no rank prints a traceback, and the
message goes into torchrun's error file too (``TORCHELASTIC_ERROR_FILE``), so torchrun's closing
report shows it as the root cause.
"""

import contextlib
import io
import json
import os
import sys
import time


@contextlib.contextmanager
def reported_once(silence_other_ranks: bool = False):
    """Turns a ``SystemExit`` with a message (or argparse's status) into one report and exit 2.

    ``silence_other_ranks`` also drops what ranks other than 0 write to stderr meanwhile (for
    argument parsing, where argparse prints usage and error itself).
    """
    rank = int(os.environ.get("RANK", "0"))
    quiet = rank and silence_other_ranks
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    except SystemExit as exit_:
        if exit_.code in (None, 0):
            raise
        message = exit_.code if isinstance(exit_.code, str) else "invalid command-line flags"
        if rank == 0 and isinstance(exit_.code, str):
            print(message, file=sys.stderr, flush=True)
        _tell_torchrun(message)
        raise SystemExit(2) from None


def _tell_torchrun(message: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with open(path, "w") as f:
        json.dump(
            {
                "message": {
                    "message": message,
                    "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))},
                }
            },
            f,
        )
