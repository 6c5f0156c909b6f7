"""Ending a process whose parent is gone, so that none of ours outlives the run that started it.

A parent killed with SIGKILL takes no children with it: torchrun starts each rank in a session of
its own (so ``kill -9`` of torchrun's process group misses the ranks), and preprocessing workers
and the checkpoint writer's queue manager wait on pipes that they themselves keep open. Each of
them therefore watches its parent.
"""

import os
import sys
import threading
import time


def exit_with_parent(parent_pid: int, who: str = "") -> None:
    """Ends this process (status 1) within a second of ``parent_pid`` ending.

    Args:
        parent_pid: the parent's pid, taken in the parent (``os.getpid()`` there) or right after
            start (``os.getppid()``): by the time it is checked the parent may already be gone.
        who: if given, printed to standard error before exiting, e.g. "rank 3".
    """
    threading.Thread(
        target=_watch, args=(parent_pid, who), daemon=True, name="exit-with-parent"
    ).start()


def _watch(parent_pid: int, who: str) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1)
    if who:
        try:
            print(
                f"{who}: the process that started it (pid {parent_pid}) is gone; exiting.",
                file=sys.stderr,
                flush=True,
            )
        except OSError:  # its standard error may have been a pipe to that process
            pass
    os._exit(1)
