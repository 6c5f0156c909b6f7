"""Where a training step's wall time goes: forward-backward schedule vs optimizer step (GPU).

    python benchmarks/step_phases.py --shape 130m --variants dense,lpa     # with the CUDA graph
    python benchmarks/step_phases.py --shape 3b -- --no-fused-kernels

Times plain steps first, then steps with a device sync around the schedule (megatron's
forward-backward, one graph replay with ``--cuda-graph``) and around the optimizer step, so each
part is measured alone; medians in ms. A part that grows without more device work (bench_train's
``--profile``) is host time: Python and kernel launches the GPU waits for.
"""

import argparse
import gc
import statistics
import time

import torch
from bench_train import variant_flags

from megatron_lpa.config.command_line import parse_args
from megatron_lpa.config.presets import SHAPES
from megatron_lpa.platform.distributed import destroy_distributed
from megatron_lpa.training.trainer import Trainer


def _timed(fn, times: list):
    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
        return result

    return wrapper


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="130m")
    parser.add_argument("--variants", default="dense,lpa")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("extra", nargs="*", help="flags after -- (default: --cuda-graph)")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        trainer = Trainer(
            parse_args(variant_flags(args.shape, variant) + (args.extra or ["--cuda-graph"]))
        )
        for _ in range(args.warmup):
            trainer.train_step()
        times = {"plain step": [], "schedule": [], "optimizer": [], "synced step": []}
        for _ in range(args.steps):
            _timed(trainer.train_step, times["plain step"])()
        trainer._run_schedule = _timed(trainer._run_schedule, times["schedule"])
        trainer._optimizer_step = _timed(trainer._optimizer_step, times["optimizer"])
        for _ in range(args.steps):
            _timed(trainer.train_step, times["synced step"])()
        print(
            f"{args.shape} {variant}: "
            + ", ".join(
                f"{name} {statistics.median(values):.1f}" for name, values in times.items()
            ),
            flush=True,
        )
        trainer.close(keep_process_group=True)
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
    destroy_distributed()


if __name__ == "__main__":
    main()
