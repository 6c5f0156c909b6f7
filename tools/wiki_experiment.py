"""LPA vs dense on real text: the paper's 130M comparison on wiki-en-2014, one GPU, one call.

    python tools/wiki_experiment.py --data-dir ../shared/data/wiki-en-2014 \
        --shards train_00 train_01 train_02 --tokenizer-model wiki32k.model \
        --variants dense lpa --seed 1 --output-dir runs/wiki

Tokenises the given train shards and the validation shard with tools/preprocess_data.py, sizes the
run so that no training token is seen twice (one epoch of what was given), then trains each variant
with pretrain_gpt.py on the same data, schedule and seed, writing ``<variant>_seed<seed>.jsonl``
(every log record with elapsed time) and ``summary.json``. ``tools/plot_experiment.py`` turns the
records of several calls into curves and a table. With all eight shards and a larger
``--global-batch-size`` the same script runs the comparison at full scale on any GPU.

Flags after ``--`` go to every run, and ``--tag`` names those runs ``<variant>_<tag>``: the same
data with megatron-core's unfused path, for instance (``--tag unfused -- --no-fused-kernels``).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_lpa.data.indexed_reader import IndexedDatasetReader
from megatron_lpa.training.presets import VARIANTS, model_flags

REPO = Path(__file__).resolve().parent.parent

NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]
# Same optimiser and schedule for every variant: AdamW (0.9, 0.95), eps 1e-5, lr 1e-3 cosine to
# 1e-4 after 10% linear warm-up, no weight decay, clip 1.0 (as the paper's training code).
# (--lr sets the peak; the final lr is a tenth of it.)
OPTIMIZER = ["--lr-decay-style", "cosine",
             "--lr-warmup-fraction", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
             "--adam-eps", "1e-5", "--weight-decay", "0.0", "--clip-grad", "1.0"]
PAPER_LR = 1e-3


def preprocess(inputs: list, prefix: Path, tokenizer_model: str, workers: int) -> str:
    """Tokenised dataset prefix; a dataset already in the output directory is reused."""
    if Path(f"{prefix}_text_document.idx").exists():
        return f"{prefix}_text_document"
    subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", *inputs,
                    "--output-prefix", str(prefix), "--tokenizer-type", "GPTSentencePieceTokenizer",
                    "--tokenizer-model", tokenizer_model, "--append-eod", "--workers", str(workers)],
                   check=True)
    return f"{prefix}_text_document"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--shards", nargs="+", required=True, help="train shard names (no suffix)")
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--variants", nargs="+", default=["dense", "lpa"], choices=VARIANTS)
    parser.add_argument("--attn-ranks", type=int, nargs="+",
                        help="LPA ranks to run instead of the preset's 128 (a rank sweep); runs "
                             "are named <variant>_r<rank>")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lr", type=float, default=PAPER_LR,
                        help="peak learning rate; runs at another than the paper's 1e-3 are "
                             "named <variant>_lr<lr>")
    parser.add_argument("--global-batch-size", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--output-dir", default="runs/wiki")
    parser.add_argument("--tag", help="suffix of the run names (with flags after --)")
    parser.add_argument("extra", nargs="*", help="flags after -- go to every run")
    args = parser.parse_args()

    out = Path(args.output_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir)
    train = preprocess([str(data / f"{s}.jsonl.zst") for s in args.shards], out / "data/train",
                       args.tokenizer_model, args.workers)
    valid = preprocess([str(data / "valid.jsonl.zst")], out / "data/valid", args.tokenizer_model,
                       args.workers)
    seq = 256
    train_tokens = int(IndexedDatasetReader(train).sequence_lengths.sum())
    valid_tokens = int(IndexedDatasetReader(valid).sequence_lengths.sum())
    tokens_per_step = args.global_batch_size * seq
    # One epoch: GPTDataset samples overlap by one token, so tokens // seq samples exist.
    train_iters = (train_tokens // seq) // args.global_batch_size - 1
    eval_iters = max(1, (valid_tokens // seq) // args.global_batch_size)
    summary = {"train_tokens": train_tokens, "valid_tokens": valid_tokens,
               "train_iters": train_iters, "tokens_per_step": tokens_per_step,
               "eval_iters": eval_iters, "seed": args.seed, "runs": {}}
    print(json.dumps(summary), flush=True)
    runs = []  # (name, model flags)
    for variant in args.variants:
        if args.attn_ranks and variant in ("lpa", "lowrank_all"):
            runs += [(f"{variant}_r{rank}", model_flags("130m", variant, attn_rank=rank))
                     for rank in args.attn_ranks]
        else:
            runs.append((variant, model_flags("130m", variant)))
    for variant, flags in runs:
        if args.lr != PAPER_LR:
            variant = f"{variant}_lr{args.lr:g}"
        if args.tag:
            variant = f"{variant}_{args.tag}"
        log = out / f"{variant}_seed{args.seed}.jsonl"
        log.unlink(missing_ok=True)
        cmd = [sys.executable, str(REPO / "pretrain_gpt.py"), *flags,
               *NO_DROPOUT, *OPTIMIZER, "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
               "--train-data-path", train, "--valid-data-path", valid,
               "--tokenizer-type", "GPTSentencePieceTokenizer",
               "--tokenizer-model", args.tokenizer_model, "--bf16",
               "--micro-batch-size", str(args.micro_batch_size),
               "--global-batch-size", str(args.global_batch_size),
               "--train-iters", str(train_iters), "--eval-interval", str(args.eval_interval),
               "--eval-iters", str(eval_iters), "--log-interval", "5", "--seed", str(args.seed),
               "--data-cache-path", str(out / "data/cache"), "--log-jsonl", str(log), *args.extra]
        subprocess.run(cmd, check=True)
        summary["runs"][variant] = str(log)
    (out / f"summary_seed{args.seed}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
