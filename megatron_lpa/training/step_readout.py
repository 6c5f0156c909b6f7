"""A step's statistics on their way to the host, and the window of steps a log line averages."""

import time
from dataclasses import dataclass, field

import torch


class StepReadout:
    """One step's statistics (a 1-D tensor on the device) on their way to the host.

    The copy is queued right behind the step, so ``read`` waits for that step only, not for the
    steps queued after it (``.item()`` or ``.cpu()`` would wait for everything queued so far).
    """

    def __init__(self, iteration: int, stats: torch.Tensor):
        self.iteration, self.ready = iteration, None
        if stats.is_cuda:
            self.values = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.values.copy_(stats, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.values = stats

    def read(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


@dataclass
class LogWindow:
    """What the next log line averages: the steps since the last one."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    steps: int = 0
    skipped: int = 0
    start: float = field(default_factory=time.time)
