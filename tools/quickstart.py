"""Dense vs. LPA from nothing, in one command: corpus, tokenizer, data, two training runs, report.

    python tools/quickstart.py          # about 4 minutes on 2 CPU cores (a GPU is used if any)
    python tools/quickstart.py --tiny   # 2 layers, 20 steps: half a minute

What it demonstrates: the system end to end on a laptop, and how to read an LPA-vs-dense
comparison; not whether LPA is better. Two LLaMA-style models of 4 layers and width 128 (1.85M
parameters), one dense and one with every attention projection a rank-32 pair (7% fewer
parameters), train on the same 0.4M tokens in the same order, about two passes, then are
evaluated on held-out documents. A single seed of a toy model has no error bars: LPA has come out
ahead (held-out perplexity 111 vs. 119) and, with ``--tiny``, behind. The paper compares models of
130M and 370M parameters trained on billions of tokens (``examples/configs/paper/``).

Needs no network: the corpus is the docstrings of the installed Python standard library. Steps:

1. ``corpus.jsonl`` and ``held_out.jsonl``: module, class and function docstrings, deduplicated, in
   a fixed shuffled order (so that the held-out 5% are a sample of all modules).
2. ``tools/train_tokenizer.py``: a SentencePiece BPE tokenizer; ``tools/preprocess_data.py``: the
   indexed datasets, documents ending in <eod>.
3. ``pretrain_gpt.py`` under torchrun, once dense and once with ``--lpa-attn-rank``, everything else
   the same; on a CPU the two run side by side, one core each. Each saves its checkpoint.
4. ``tools/evaluate.py`` on each checkpoint: loss, perplexity and bits per byte over every
   held-out token once (the validation curve during training uses part of it). The report: a
   table, ``loss_curves.png`` and ``summary.json`` in ``--output-dir``, and the README's commands
   that evaluate, sample from, export and import the LPA checkpoint.

Times: 3.9 minutes (0.5 with ``--tiny``) measured on 2 CPU cores; they are no benchmark, and the
report and the echoed log lines give no throughput (see BENCHMARKS.md).
"""

import argparse
import ast
import dataclasses
import functools
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import tokenize
import warnings
from pathlib import Path

import torch

try:
    import matplotlib

    matplotlib.use("Agg")  # files only; the quickstart also runs on machines without a display
    from matplotlib import pyplot
except ImportError:
    raise SystemExit(
        "tools/quickstart.py draws its loss curves with matplotlib: "
        "pip install -e '.[test]' (or pip install matplotlib), then run it again."
    ) from None

REPO = Path(__file__).resolve().parents[1]

# Standard-library folders whose docstrings are not English prose about the library, or not the
# same on every machine with this Python.
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib"}
# Docstrings shorter than this are mostly "Return self." and the like.
_MIN_DOCSTRING_CHARS = 40
# About 400k tokens of docstrings: a larger vocabulary would leave most pieces rarely seen.
_VOCAB_SIZE = 4096

# The trainer's console lines the quickstart echoes (the figures themselves come from --log-jsonl).
_ECHOED_LINES = ("iteration ", "validation at ", "test at ")
# Throughput on a CPU shared with two runs and anything else is no measurement (train.log keeps it).
_UNECHOED_FIELDS = ("tokens/s", "TFLOP/s")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", default="runs/quickstart", help="Where everything goes (runs/quickstart)."
    )
    parser.add_argument("--tiny", action="store_true", help="2 layers, 20 steps: half a minute.")
    parser.add_argument("--train-iters", type=int, help="Steps a run (400; 20 with --tiny).")
    parser.add_argument("--lpa-attn-rank", type=int, help="LPA's rank (default: hidden / 4).")
    return parser.parse_args(argv)


# ----- 1. corpus ---------------------------------------------------------------------------------
def _docstrings(path: Path) -> list:
    """Module, class and function docstrings of one source file (none if it does not parse)."""
    try:
        with tokenize.open(path) as source, warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # old files' invalid escape sequences
            tree = ast.parse(source.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = (
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    )
    return [
        doc for doc in map(ast.get_docstring, nodes) if doc and len(doc) >= _MIN_DOCSTRING_CHARS
    ]


def build_stdlib_corpus(path: Path, held_out: Path) -> int:
    """Writes the standard library's docstrings as JSON lines ``{"text": ...}``, every twentieth
    to ``held_out``, the rest to ``path``; returns the count.

    The same Python installation always gives the same files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    documents, seen = [], set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in _SKIPPED_FOLDERS)
        for name in sorted(files):
            if name.endswith(".py"):
                for doc in _docstrings(Path(folder) / name):
                    if doc not in seen:
                        seen.add(doc)
                        documents.append(doc)
    random.Random(0).shuffle(documents)
    with open(path, "w", encoding="utf-8") as corpus, open(held_out, "w", encoding="utf-8") as rest:
        for i, doc in enumerate(documents):
            (rest if i % 20 == 0 else corpus).write(json.dumps({"text": doc}) + "\n")
    return len(documents)


# ----- 2. tokenizer and dataset ------------------------------------------------------------------
def as_flags(options: dict) -> list:
    """``{"model-prefix": p, "append-eod": True, "bf16": False}`` -> ``["--model-prefix", "p",
    "--append-eod"]``: True is a bare flag, False leaves the flag out."""
    flags = []
    for name, value in options.items():
        if value is True:
            flags.append(f"--{name}")
        elif value is not False:
            flags += [f"--{name}", str(value)]
    return flags


def run_tool(name: str, options: dict) -> None:
    """Runs ``tools/<name>.py`` with ``options``, showing the command; stops if it fails."""
    command = [sys.executable, str(REPO / "tools" / f"{name}.py"), *as_flags(options)]
    print("$ python " + " ".join(command[1:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def prepare_data(data: Path) -> Path:
    """Corpus, tokenizer (``data/tokenizer.model``) and indexed datasets ``data/corpus`` and
    ``data/held_out``; returns the training prefix."""
    corpus, held_out = data / "corpus.jsonl", data / "held_out.jsonl"
    documents = build_stdlib_corpus(corpus, held_out)
    print(
        f"{corpus}, {held_out}: {documents:,} docstrings, "
        f"{(corpus.stat().st_size + held_out.stat().st_size) / 1e6:.1f} MB",
        flush=True,
    )
    run_tool(
        "train_tokenizer",
        {"input": corpus, "model-prefix": data / "tokenizer", "vocab-size": _VOCAB_SIZE},
    )
    for source in (corpus, held_out):
        run_tool(
            "preprocess_data",
            {
                "input": source,
                "output-prefix": data / source.stem,
                "tokenizer-type": "GPTSentencePieceTokenizer",
                "tokenizer-model": data / "tokenizer.model",
                "append-eod": True,
                "workers": 2,
            },
        )
    return data / "corpus_text_document"


def dataset_size(prefix: Path) -> dict:
    """Documents and tokens of an indexed dataset."""
    from megatron_lpa.data.indexed_reader import IndexedDatasetReader

    dataset = IndexedDatasetReader(str(prefix))
    return {"documents": dataset.num_documents, "tokens": int(dataset.sequence_lengths.sum())}


# ----- 3. training -------------------------------------------------------------------------------
def training_options(args: argparse.Namespace, data_prefix: Path, tokenizer_model: Path) -> dict:
    """``pretrain_gpt.py`` options the two runs share (the LPA run adds ``lpa-attn-rank``)."""
    if args.tiny:
        shape = {"num-layers": 2, "hidden-size": 64, "ffn-hidden-size": 176, "seq-length": 64}
        batch, eval_iters = 8, 2
    else:
        shape = {"num-layers": 4, "hidden-size": 128, "ffn-hidden-size": 352, "seq-length": 128}
        batch, eval_iters = 16, 5  # 80 samples of 128 tokens: half the held-out documents
    iters = args.train_iters
    return {
        **shape,
        "num-attention-heads": 4,
        # LLaMA-style, as the paper's models.
        "swiglu": True,
        "normalization": "RMSNorm",
        "position-embedding-type": "rope",
        "disable-bias-linear": True,
        "untie-embeddings-and-output-weights": True,
        "hidden-dropout": 0.0,
        "attention-dropout": 0.0,
        "bf16": torch.cuda.is_available(),
        "micro-batch-size": batch,
        "global-batch-size": batch,
        "train-iters": iters,
        "lr": 3e-3,
        "min-lr": 3e-4,
        "lr-decay-style": "cosine",
        "lr-warmup-fraction": 0.1,
        "weight-decay": 0.1,
        "adam-beta2": 0.95,
        "train-data-path": data_prefix,
        "valid-data-path": data_prefix.parent / "held_out_text_document",
        "tokenizer-type": "GPTSentencePieceTokenizer",
        "tokenizer-model": tokenizer_model,
        # On CPU, loader workers would compete with the model for the few cores; the memory-mapped
        # samples are cheap to read in the training process.
        "num-workers": 2 if torch.cuda.is_available() else 0,
        "log-interval": max(1, iters // 20),
        "eval-interval": max(1, iters // 10),
        "eval-iters": eval_iters,
    }


def train(variant: str, flags: list, run_dir: Path, env: dict) -> None:
    """Runs ``pretrain_gpt.py`` on one process, echoing its log lines (less throughput) with the
    variant's name.

    The full output goes to ``run_dir/train.log``, every logged metric to
    ``run_dir/metrics.jsonl``, the checkpoint to ``run_dir/checkpoint``. A failure is raised as
    ``SystemExit`` in the caller's ``join``.
    """
    log_path, metrics_path = run_dir / "train.log", run_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)  # the trainer appends to it
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # a new run, not a resumed one
    flags = flags + ["--log-jsonl", str(metrics_path), "--save", str(run_dir / "checkpoint")]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    print(
        f"\n[{variant}] $ python {' '.join(launcher)} pretrain_gpt.py {' '.join(flags)}", flush=True
    )
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            [sys.executable, *launcher, str(REPO / "pretrain_gpt.py"), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        ) as process,
    ):
        for line in process.stdout:
            log.write(line)
            if line.startswith(_ECHOED_LINES):
                fields = line.rstrip("\n").split(" | ")
                kept = [field for field in fields if not field.startswith(_UNECHOED_FIELDS)]
                print(f"[{variant}] {' | '.join(kept)}", flush=True)
    if process.returncode:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(
            f"{tail}\n[{variant}] training failed (exit {process.returncode}); "
            f"the full output is in {log_path}."
        )


def evaluate_held_out(run_dir: Path, held_out: Path, env: dict) -> dict:
    """``tools/evaluate.py`` on the run's checkpoint: every held-out token predicted once."""
    out = run_dir / "held_out_eval.json"
    command = [
        sys.executable,
        str(REPO / "tools" / "evaluate.py"),
        "--load",
        str(run_dir / "checkpoint"),
        "--data",
        str(held_out),
        "--output",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"evaluate.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["datasets"][str(held_out)]


def in_parallel(jobs: dict) -> dict:
    """Runs ``{name: function}`` side by side in threads; returns ``{name: result}`` and re-raises
    the first failure."""
    results, errors = {}, []

    def run(name, job):
        try:
            results[name] = job()
        except BaseException as error:  # SystemExit included: the job's own message
            errors.append(error)

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def summarize_metrics(metrics_path: Path) -> dict:
    """Loss curves from the trainer's records, and the training time."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    validation = [r for r in records if r["split"] == "validation"]
    if not train_records or not validation:
        raise SystemExit(
            f"{metrics_path} has no training or no validation records; give the runs more steps "
            "(--train-iters)."
        )
    return {
        "train_loss": [[r["iteration"], r["lm loss"]] for r in train_records],
        "validation_loss": [[r["iteration"], r["lm loss"]] for r in validation],
        "training_seconds": train_records[-1]["elapsed_s"],
    }


def count_parameters(flags: list) -> int:
    """Parameters of the model ``flags`` describe (built on CPU, uninitialised, in this process)."""
    from megatron_lpa.config.command_line import parse_args as parse_training_args
    from megatron_lpa.config.model_config import lpa_config, padded_vocab_size
    from megatron_lpa.models.builder import build_model
    from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed
    from megatron_lpa.tokenizers import build_tokenizer

    cfg = parse_training_args(flags)
    vocab = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).vocab_size
    initialize_distributed()
    try:
        config = dataclasses.replace(
            lpa_config(cfg, padded_vocab_size(vocab, cfg)),
            use_cpu_initialization=True,
            perform_initialization=False,
        )
        return sum(p.numel() for p in build_model(config).parameters())
    finally:
        destroy_distributed()


def compare(options: dict, ranks: dict, output: Path, held_out: Path) -> dict:
    """Trains and evaluates one model per ``{variant: lpa_attn_rank}``; returns their figures.

    On a CPU the runs go side by side, one core each (a tiny model's matmuls gain little from a
    second core); on a GPU one after the other.
    """
    variant_flags = {
        variant: as_flags({**options, "lpa-attn-rank": rank}) for variant, rank in ranks.items()
    }
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(ranks)))

    def train_and_evaluate(variant: str) -> dict:
        run_dir = output / variant
        run_dir.mkdir(exist_ok=True)
        train(variant, variant_flags[variant], run_dir, env)
        return evaluate_held_out(run_dir, held_out, env)

    jobs = {variant: functools.partial(train_and_evaluate, variant) for variant in ranks}
    if torch.cuda.is_available():
        held_out_figures = {variant: job() for variant, job in jobs.items()}
    else:
        held_out_figures = in_parallel(jobs)
    return {
        variant: {
            "lpa_attn_rank": ranks[variant],
            **summarize_metrics(output / variant / "metrics.jsonl"),
            "held_out": held_out_figures[variant],
            "parameters": count_parameters(flags),
        }
        for variant, flags in variant_flags.items()
    }


# ----- 4. report ---------------------------------------------------------------------------------
def format_table(results: dict) -> str:
    """The side-by-side comparison of the variants (held-out figures of the final checkpoints)."""
    rows = [("variant", "attn rank", "params", "loss", "ppl", "bits/byte")]
    for variant, result in results.items():
        held_out = result["held_out"]
        rows.append(
            (
                variant,
                str(result["lpa_attn_rank"] or "-"),
                f"{result['parameters']:,}",
                f"{held_out['loss']:.4f}",
                f"{held_out['perplexity']:.2f}",
                f"{held_out['bits_per_byte']:.4f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_loss_curves(results: dict, path: Path) -> None:
    """Training loss against step (lines) and validation loss (markers), one colour a variant."""
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for (variant, result), colour in zip(results.items(), ("tab:blue", "tab:orange")):
        steps, losses = zip(*result["train_loss"])
        axes.plot(steps, losses, color=colour, label=f"{variant} train")
        steps, losses = zip(*result["validation_loss"])
        axes.plot(steps, losses, "o--", color=colour, label=f"{variant} validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title("Dense vs. LPA attention")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def next_commands(output: Path) -> list:
    """The README's commands that take the LPA checkpoint in ``output`` further: evaluate it,
    sample from it, export it both ways, and import the merged export back, factored at rank 16
    by truncated SVD."""
    lpa, hf = output / "lpa" / "checkpoint", output / "hf"
    commands = [
        ["tools/evaluate.py", "--load", lpa, "--data", output / "data" / "held_out.jsonl"],
        ["tools/generate.py", "--load", lpa, "--prompt", "Return the", "--top-p", "0.9"],
        [
            "tools/export_hf.py",
            "--load",
            lpa,
            "--save",
            hf / "lpa_factored",
            "--format",
            "factored",
        ],
        ["tools/export_hf.py", "--load", lpa, "--save", hf / "lpa_merged", "--format", "merged"],
        [
            "tools/import_hf.py",
            "--load",
            hf / "lpa_merged",
            "--save",
            output / "imported",
            "--lpa-attn-rank",
            "16",
        ],
    ]
    return [shlex.join(["python", *map(str, command)]) for command in commands]


def main(argv=None) -> None:
    start = time.time()
    args = parse_args(argv)
    args.train_iters = args.train_iters or (20 if args.tiny else 400)
    output = Path(args.output_dir)
    (output / "data").mkdir(parents=True, exist_ok=True)

    data_prefix = prepare_data(output / "data")
    held_out = output / "data" / "held_out.jsonl"
    options = training_options(args, data_prefix, output / "data" / "tokenizer.model")
    ranks = {"dense": 0, "lpa": args.lpa_attn_rank or options["hidden-size"] // 4}
    results = compare(options, ranks, output, held_out)

    plot_loss_curves(results, output / "loss_curves.png")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {
        "device": device,
        "dataset": dataset_size(data_prefix),
        "held_out": dataset_size(output / "data" / "held_out_text_document"),
        "training_options": {name: str(value) for name, value in options.items()},
        "variants": results,
        "total_seconds": round(time.time() - start, 1),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tokens = results["lpa"]["held_out"]["tokens"]
    print(
        f"\nHeld-out documents ({tokens:,} tokens, each predicted once by the final "
        f"checkpoint):\n{format_table(results)}\n"
    )
    print(
        f"LPA makes each attention projection ({options['hidden-size']} x "
        f"{options['hidden-size']}) a pair of rank {ranks['lpa']}. One seed of a toy model on a "
        "small corpus: the gap between the rows is no finding about LPA (see the docstring)."
    )
    print(
        f"{output / 'loss_curves.png'}, {output / 'summary.json'} "
        f"({device}, {summary['total_seconds'] / 60:.1f} min)\n"
    )
    print("Next, the LPA checkpoint (all but evaluate.py need pip install -e '.[transformers]'):")
    for command in next_commands(output):
        print(f"  {command}")
    if not all(math.isfinite(r["held_out"]["perplexity"]) for r in results.values()):
        raise SystemExit("A held-out perplexity is not finite; see the training logs.")


if __name__ == "__main__":
    main()
