"""Do parallel layouts follow the single-GPU loss curve? 130M dense and LPA, bf16, same data.

    python benchmarks/parallel_numerics.py --layouts tp1 tp2_sp tp4 tp4_sp pp2 pp4 dp2 tp2_dp2 \
        --variants dense lpa --steps 100 --output-dir runs/numerics

Each (variant, layout) is one ``torchrun pretrain_gpt.py`` run on the same random-token stream
(``--mock-data``, fixed seed, global batch 64 × 256 tokens, dropout off) with ``--log-jsonl``; the
table gives, per run, the largest and mean absolute difference of the per-step training loss from
the ``tp1`` run of the same variant, and the final loss.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from megatron_lpa.config.presets import model_flags

REPO = Path(__file__).resolve().parent.parent

NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]
# layout name -> (GPUs, flags)
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "tp4": (4, ["--tensor-model-parallel-size", "4"]),
    "tp4_sp": (4, ["--tensor-model-parallel-size", "4", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp4": (4, ["--pipeline-model-parallel-size", "4"]),
    "dp2": (2, ["--use-distributed-optimizer"]),
    "tp2_dp2": (4, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]),
}
VARIANTS = ("dense", "lpa")


def run(variant: str, layout: str, steps: int, out: Path) -> Path:
    gpus, flags = LAYOUTS[layout]
    log = out / f"{variant}_{layout}.jsonl"
    log.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(gpus),
        str(REPO / "pretrain_gpt.py"),
        *model_flags("130m", variant),
        *NO_DROPOUT,
        *flags,
        "--mock-data",
        "--vocab-size",
        "32000",
        "--bf16",
        "--micro-batch-size",
        "16",
        "--global-batch-size",
        "64",
        "--lr",
        "1e-3",
        "--lr-warmup-iters",
        "10",
        "--train-iters",
        str(steps),
        "--eval-iters",
        "0",
        "--log-interval",
        "1",
        "--seed",
        "1",
        "--log-jsonl",
        str(log),
    ]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="4"))
    return log


def losses(log: Path) -> list:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["lm loss"] for r in records if r["split"] == "train"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output-dir", default="runs/numerics")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    layouts = ["tp1"] + [layout for layout in args.layouts if layout != "tp1"]
    rows = []
    for variant in args.variants:
        reference = losses(run(variant, "tp1", args.steps, out))
        for layout in layouts[1:]:
            curve = losses(run(variant, layout, args.steps, out))
            diffs = [abs(a - b) for a, b in zip(curve, reference)]
            rows.append(
                (variant, layout, max(diffs), statistics.mean(diffs), curve[-1], reference[-1])
            )
    print(
        "| variant | layout | max abs loss diff vs tp1 | mean abs diff | final loss | tp1 final |"
    )
    print("|---|---|---|---|---|---|")
    for variant, layout, worst, mean, final, ref in rows:
        print(f"| {variant} | {layout} | {worst:.4f} | {mean:.4f} | {final:.4f} | {ref:.4f} |")
    (out / "numerics.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
