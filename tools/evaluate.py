"""Perplexity and bits per byte of a trained checkpoint on any number of datasets.

    python tools/evaluate.py --load runs/lpa --data valid.jsonl.zst wiki_test_text_document
    torchrun --nproc-per-node 8 tools/evaluate.py --load runs/lpa --data ... \
        --tensor-model-parallel-size 2 --micro-batch-size 16 --output eval.json

Each dataset (a ``.jsonl[.zst|.gz|.xz]`` file, tokenized here with the run's tokenizer, or an
indexed-dataset prefix) is read as one stream of documents, each followed by the end-of-document
token, cut into consecutive samples of the run's sequence length, so that every token but the
first is predicted exactly once (``--max-samples`` stops early). The model is the checkpoint's run,
rebuilt at this layout; the loss is training's own validation code (``training/evaluation.py``).
Prints a table and writes ``--output`` (JSON) from the last process.
"""

import argparse
import json
import math
from functools import partial
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.utils.data import Subset

# megatron_lpa before megatron-core: importing it filters megatron-core's import-time warnings.
from megatron_lpa.platform.distributed import destroy_distributed
from megatron_lpa.training.data_loading import micro_batches
from megatron_lpa.training.evaluation import (
    PaddedDataset,
    SequentialWindows,
    evaluate,
    forward_step,
    token_bytes_on_device,
    token_stream,
)
from megatron_lpa.training.saved_model import load_saved_model


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="the run's --save directory")
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help=".jsonl[.zst|.gz|.xz] files or indexed-dataset prefixes",
    )
    parser.add_argument("--json-key", default="text", help="the key holding a line's text")
    parser.add_argument("--tokenizer-model", help="the tokenizer file, if it moved since training")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument(
        "--max-samples", type=int, help="evaluate at most this many samples of each"
    )
    parser.add_argument("--output", help="write the results here as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    saved = load_saved_model(
        args.load,
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.micro_batch_size,
        args.tokenizer_model,
    )
    cfg, tokenizer = saved.cfg, saved.tokenizer
    if tokenizer is None:
        raise SystemExit(
            f"{args.load} was trained without a tokenizer (--mock-data); it has no "
            "text to evaluate."
        )
    step = partial(
        forward_step, token_bytes=token_bytes_on_device(tokenizer, saved.config.vocab_size)
    )
    schedule = get_forward_backward_func()
    dp_rank, per_step = parallel_state.get_data_parallel_rank(), cfg.schedule.global_batch_size

    def run(iterator):
        return schedule(
            forward_step_func=step,
            data_iterator=iterator,
            model=[saved.model],
            num_microbatches=1,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.schedule.micro_batch_size,
            forward_only=True,
        )

    results = {}
    for source in args.data:
        windows = SequentialWindows(
            token_stream(source, tokenizer, args.json_key),
            cfg.model.seq_length,
            pad_id=tokenizer.eod,
        )
        count = min(len(windows), args.max_samples or len(windows))
        steps = math.ceil(count / per_step)
        data = PaddedDataset(Subset(windows, range(count)), steps * per_step)
        batches = micro_batches(data, 0, cfg, dp_rank, saved.config.vocab_size)
        totals = evaluate(run, batches, steps)
        results[source] = {**totals.as_dict(), "samples": count}
    if dist.get_rank() == dist.get_world_size() - 1:
        _report(args, saved.iteration, results)
    destroy_distributed()
    return results


def _report(args, iteration: int, results: dict) -> None:
    print(f"{args.load} (iteration {iteration}):")
    print(f"{'dataset':<48} {'tokens':>12} {'loss':>8} {'ppl':>10} {'bits/byte':>10}")
    for source, r in results.items():
        bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "-"
        print(
            f"{source:<48} {r['tokens']:>12,} {r['loss']:>8.4f} {r['perplexity']:>10.2f} {bpb:>10}"
        )
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {"checkpoint": args.load, "iteration": iteration, "datasets": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
