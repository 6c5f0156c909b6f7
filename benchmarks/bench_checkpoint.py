"""What checkpoint checksums cost: a save of a preset shape's model, and the SHA-256 of its files.

    python benchmarks/bench_checkpoint.py --shape 130m --output /tmp/bench_ckpt

Builds the dense model of ``--shape`` (random tokens, no data), takes one step, saves (the first
save also starts the checkpoint writer's helper process, so it is not timed), takes another step
and times the second save, the hashing inside it (``checksums``) and, three times, the check a
load makes (``find_damage``). One process; on CPU it needs about 3 GB of memory and disk at 130M.
"""

import argparse
import shutil
import time
from pathlib import Path

from megatron_lpa.checkpointing import checkpoint
from megatron_lpa.checkpointing.checksums import find_damage
from megatron_lpa.checkpointing.files import checkpoint_dir
from megatron_lpa.config.command_line import parse_args
from megatron_lpa.config.presets import SHAPES, model_flags
from megatron_lpa.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="130m")
    parser.add_argument(
        "--output", type=Path, required=True, help="checkpoint directory (replaced)"
    )
    args = parser.parse_args()
    shutil.rmtree(args.output, ignore_errors=True)
    trainer = Trainer(
        parse_args(
            model_flags(args.shape, "dense")
            + [
                "--mock-data",
                "--vocab-size",
                "32000",
                "--micro-batch-size",
                "1",
                "--train-iters",
                "2",
                "--lr",
                "1e-4",
                "--eval-iters",
                "0",
                "--num-workers",
                "0",
                "--save",
                str(args.output),
            ]
        )
    )
    hashing = []
    timed_checksums = checkpoint.checksums

    def checksums(directory):
        start = time.perf_counter()
        manifest = timed_checksums(directory)
        hashing.append(time.perf_counter() - start)
        return manifest

    checkpoint.checksums = checksums  # the name save_checkpoint calls
    for iteration in (1, 2):
        trainer.train_step()
        start = time.perf_counter()
        checkpoint.save_checkpoint(
            str(args.output),
            iteration,
            trainer.model,
            trainer.optimizer,
            trainer.scheduler,
            dict(trainer.state),
        )
        save_seconds = time.perf_counter() - start
    directory = checkpoint_dir(str(args.output), 2)
    size = sum(path.stat().st_size for path in directory.iterdir())
    checks = []
    for _ in range(3):
        start = time.perf_counter()
        assert find_damage(directory) == []
        checks.append(time.perf_counter() - start)
    params = sum(param.numel() for param in trainer.model[0].parameters())
    print(
        f"{args.shape}: {params / 1e6:.1f}M parameters, checkpoint {size / 1e9:.2f} GB; save "
        f"{save_seconds:.2f} s, of which hashing {hashing[-1]:.2f} s; load-time check "
        + ", ".join(f"{seconds:.2f}" for seconds in checks)
        + " s"
    )
    trainer.close()


if __name__ == "__main__":
    main()
