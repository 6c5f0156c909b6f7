"""LPA vs dense on real text: the paper's setting-2 runs (or any config family) on wiki-en-2014.

    python experiments/wiki_experiment.py --data-dir <wiki-en-2014> \
        --shards train_00 train_01 train_02 --tokenizer-model wiki32k.model \
        --variants dense lpa --seed 1 --epochs 1 --tag paper --output-dir runs/wiki

Tokenises the given train shards and ``valid.jsonl.zst`` with tools/preprocess_data.py (reusing
a tokenised copy already in the output directory), then trains each variant from
``--config-family``'s config (``<family>_<variant>.yaml``: shapes, init, optimiser, schedule,
batch) for ``--epochs`` passes over the given shards, with validation over the whole held-out
shard ``--evals`` times, on the same data order and seed; flags after ``--`` go to every run
(``-- --init-style megatron`` for our recipe). Each run ``<variant>_<tag>_seed<seed>`` writes its
log records (``.jsonl``, with elapsed time) and, from its final checkpoint, tools/evaluate.py's
perplexity and bits per byte on the whole held-out shard (``_eval.json``).
``experiments/plot_experiment.py`` turns a folder of them into curves and tables.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_lpa.config.presets import VARIANTS
from megatron_lpa.data.indexed_reader import IndexedDatasetReader

REPO = Path(__file__).resolve().parent.parent
PAPER_SETTING2 = REPO / "examples/configs/paper/setting2_130m"


def preprocess(inputs: list, prefix: Path, tokenizer_model: str, workers: int) -> str:
    """Tokenised dataset prefix; a dataset already in the output directory is reused."""
    if Path(f"{prefix}_text_document.idx").exists():
        return f"{prefix}_text_document"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/preprocess_data.py"),
            "--input",
            *inputs,
            "--output-prefix",
            str(prefix),
            "--tokenizer-type",
            "GPTSentencePieceTokenizer",
            "--tokenizer-model",
            tokenizer_model,
            "--append-eod",
            "--workers",
            str(workers),
        ],
        check=True,
    )
    return f"{prefix}_text_document"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        required=True,
        metavar="DIR",
        help="a folder of Pile-format shards: <shard>.jsonl.zst and "
        'valid.jsonl.zst (JSON lines with a "text" field, zstd-compressed, as '
        "The Pile's shards are: https://pile.eleuther.ai; any text can be written "
        "so; experiments/README.md)",
    )
    parser.add_argument("--shards", nargs="+", required=True, help="train shard names (no suffix)")
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument(
        "--config-family",
        default=str(PAPER_SETTING2),
        help="configs <family>_<variant>.yaml (default: the paper's setting 2)",
    )
    parser.add_argument("--variants", nargs="+", default=["dense", "lpa"], choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the train shards")
    parser.add_argument("--global-batch-size", type=int, help="default: the config's")
    parser.add_argument("--micro-batch-size", type=int, default=64, help="per GPU")
    parser.add_argument("--evals", type=int, default=20, help="validations per run")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--output-dir", default="runs/wiki")
    parser.add_argument("--tag", default="run", help="names this group of runs")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("extra", nargs="*", help="flags after -- go to every run")
    args = parser.parse_args()

    out = Path(args.output_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir)
    train = preprocess(
        [str(data / f"{s}.jsonl.zst") for s in args.shards],
        out / "data/train",
        args.tokenizer_model,
        args.workers,
    )
    valid_file = str(data / "valid.jsonl.zst")
    valid = preprocess([valid_file], out / "data/valid", args.tokenizer_model, args.workers)
    for variant in args.variants:
        config = Path(f"{args.config_family}_{variant}.yaml")
        settings = yaml.safe_load(config.read_text())
        seq = settings["seq_length"]
        batch = args.global_batch_size or settings["global_batch_size"]
        train_tokens = int(IndexedDatasetReader(train).sequence_lengths.sum())
        valid_tokens = int(IndexedDatasetReader(valid).sequence_lengths.sum())
        # GPTDataset's samples overlap by one token: tokens // seq samples an epoch.
        train_iters = args.epochs * (train_tokens // seq) // batch
        eval_iters = -(-(valid_tokens // seq) // batch)  # the whole held-out shard, once
        name = f"{variant}_{args.tag}_seed{args.seed}"
        log, checkpoint = out / f"{name}.jsonl", out / "checkpoints" / name
        log.unlink(missing_ok=True)
        shutil.rmtree(checkpoint, ignore_errors=True)
        cmd = [
            sys.executable,
            str(REPO / "pretrain_gpt.py"),
            "--config",
            str(config),
            "--train-data-path",
            train,
            "--valid-data-path",
            valid,
            "--tokenizer-type",
            "GPTSentencePieceTokenizer",
            "--tokenizer-model",
            args.tokenizer_model,
            "--micro-batch-size",
            str(args.micro_batch_size),
            "--global-batch-size",
            str(batch),
            "--train-iters",
            str(train_iters),
            "--eval-interval",
            str(max(1, train_iters // args.evals)),
            "--eval-iters",
            str(eval_iters),
            "--log-interval",
            "5",
            "--seed",
            str(args.seed),
            "--data-cache-path",
            str(out / "data/cache"),
            "--log-jsonl",
            str(log),
            "--save",
            str(checkpoint),
            *args.extra,
        ]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools/evaluate.py"),
                "--load",
                str(checkpoint),
                "--data",
                valid_file,
                "--micro-batch-size",
                str(args.micro_batch_size),
                "--output",
                str(out / f"{name}_eval.json"),
            ],
            check=True,
        )
        (out / f"{name}_run.json").write_text(
            json.dumps(
                {
                    "command": cmd,
                    "train_tokens": train_tokens,
                    "valid_tokens": valid_tokens,
                    "train_iters": train_iters,
                    "tokens_per_step": batch * seq,
                    "epochs": args.epochs,
                },
                indent=1,
            )
        )
        if not args.keep_checkpoints:
            shutil.rmtree(checkpoint)


if __name__ == "__main__":
    main()
