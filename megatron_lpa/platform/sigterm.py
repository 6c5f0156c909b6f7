"""SIGTERM, remembered from a process's first line until the Trainer decides what it means.

A SIGTERM (Slurm's pre-emption warning) can come while torch and megatron-core are still being
imported, seconds to minutes on a busy shared filesystem. Remembered, it is honoured like one
that comes during training (``--exit-signal-handler``: finish the step, save, exit 0, so that
torchrun exits 0 too) instead of killing the process; without that flag it is delivered again
once the run's settings are known.
"""

import os
import signal

_remembering = False
_received = False


def remember() -> None:
    """Makes SIGTERM set a flag instead of ending this process."""
    global _remembering
    _remembering = True
    signal.signal(signal.SIGTERM, _remember)


def received() -> bool:
    """Whether a SIGTERM came since ``remember()``."""
    return _received


def forget() -> None:
    """Makes SIGTERM end this process again, at once if one came while it was remembered."""
    global _remembering
    if not _remembering:
        return
    _remembering = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _received:
        os.kill(os.getpid(), signal.SIGTERM)


def _remember(signum, frame) -> None:
    global _received
    _received = True
