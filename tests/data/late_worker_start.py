"""Runs a tool (argv[1], its arguments after it) with its second forked process, a pool worker,
held for 2 s right after fork in C, where no Python signal handler runs: a worker the scheduler
has not run yet when the pool is stopped, as on a busy machine."""

import ctypes
import functools
import multiprocessing.context
import os
import runpy
import sys

HOLD = functools.partial(ctypes.CDLL(None).usleep, 2_000_000)


class LateForkProcess(multiprocessing.context.ForkProcess):
    started = 0

    def start(self):
        LateForkProcess.started += 1
        if LateForkProcess.started == 2:
            os.register_at_fork(after_in_child=HOLD)
        super().start()


multiprocessing.context.ForkContext.Process = LateForkProcess
tool = sys.argv.pop(1)
sys.argv[0] = tool
runpy.run_path(tool, run_name="__main__")
