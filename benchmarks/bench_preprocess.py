"""Side-by-side speed benchmark: tools/preprocess_data.py against Megatron-LM's.

Takes the first N documents of a corpus (decompressed to plain JSON lines), trains a 32k
SentencePiece BPE model on them with tools/train_tokenizer.py, then runs both tools on the
same input with the same tokenizer (GPTSentencePieceTokenizer), --append-eod and worker
count, alternating the two, and prints a markdown table of the best of the repeats (other load
on the machine only ever slows a run down). It also checks that both wrote the same bytes.

Megatron-LM's tools/preprocess_data.py is not in the megatron-core wheel: pass a copy with
--megatron-lm-script. It is run unchanged, with stand-ins for the two modules it imports from
outside the wheel (megatron.training's tokenizer flags, and megatron-core's build_tokenizer
under the path newer Megatron-LM versions use).

Example:
    python benchmarks/bench_preprocess.py --corpus wiki-en-2014/train_07.jsonl.zst \\
        --megatron-lm-script /tmp/Megatron-LM/tools/preprocess_data.py
"""

import argparse
import filecmp
import os
import platform
import re
import resource
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_FLAG = "--run-megatron-lm"


def _run_megatron_lm(script: str, argv: list[str]) -> None:
    """Runs Megatron-LM's preprocess_data.py with stand-ins for modules the wheel lacks."""
    import types

    from megatron.core.tokenizers.text.utils import build_tokenizer

    def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # The tokenizer flags megatron-core's build_tokenizer reads.
        group = parser.add_argument_group("tokenizer")
        for flag in ("--tokenizer-type", "--tokenizer-model", "--vocab-file", "--merge-file"):
            group.add_argument(flag)
        group.add_argument("--tokenizer-metadata")
        group.add_argument("--tiktoken-pattern")
        group.add_argument("--vocab-size", type=int)
        group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
        group.add_argument("--tokenizer-special-tokens", nargs="+")
        for flag in (
            "--tokenizer-sentencepiece-legacy",
            "--tokenizer-hf-use-fast",
            "--trust-remote-code",
            "--tokenizer-hf-include-special-tokens",
        ):
            group.add_argument(flag, action="store_true")
        return parser

    training = types.ModuleType("megatron.training")
    training.__path__ = []
    arguments = types.ModuleType("megatron.training.arguments")
    arguments._add_tokenizer_args = add_tokenizer_args
    utils = types.ModuleType("megatron.core.tokenizers.utils")
    utils.__path__ = []
    sys.modules.update(
        {
            "megatron.training": training,
            "megatron.training.arguments": arguments,
            "megatron.core.tokenizers.utils": utils,
            "megatron.core.tokenizers.utils.build_tokenizer": build_tokenizer,
        }
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module
    spec.loader.exec_module(module)
    # Newer versions end by summarising --find-optimal-num-workers results, which fails
    # without them; the run itself is finished by then.
    module.find_optimal_num_workers = lambda directory: None
    sys.argv = [script, *argv]
    module.main()


def prepare_input(corpus: str, documents: int, path: Path) -> None:
    """Writes the first ``documents`` lines of ``corpus`` as plain JSON lines."""
    sys.path.insert(0, str(REPO))
    from megatron_lpa.data.jsonl_reader import iter_line_blocks

    lines = (line for block in iter_line_blocks([corpus]) for line in block.lines())
    with open(path, "wb") as out:
        for line in islice(lines, documents):
            out.write(line + b"\n")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[float, float, str]:
    """Runs a command; returns its wall time, the CPU time of its processes, and its output."""
    start, start_cpu = time.perf_counter(), _children_cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds, cpu_seconds = time.perf_counter() - start, _children_cpu_seconds() - start_cpu
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, cpu_seconds, done.stdout + done.stderr


def processing_seconds(tool: str, output: str, documents: int) -> float:
    """The time each tool reports for its processing loop (after start-up)."""
    if tool == "megatron-lm":
        rate = re.findall(r"Processed \d+ documents \(([\d.]+) docs/s", output)[-1]
        return documents / float(rate)
    return float(re.search(r"time: ([\d.]+) s", output).group(1))


def count_tokens(prefix: Path) -> int:
    import numpy as np

    from megatron_lpa.data.indexed_reader import IndexedDatasetReader

    return int(IndexedDatasetReader(str(prefix)).sequence_lengths.sum(dtype=np.int64))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == LAUNCHER_FLAG:
        _run_megatron_lm(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        required=True,
        help='JSON lines (.jsonl, .jsonl.zst etc.) with a "text" field, e.g. one '
        "shard of a Pile-format corpus (experiments/README.md: where to get one)",
    )
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool and worker count")
    parser.add_argument("--megatron-lm-script", help="Megatron-LM's tools/preprocess_data.py")
    parser.add_argument("--workdir", default="/tmp/bench_preprocess")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"first{args.documents}.jsonl"
    if not source.exists():
        prepare_input(args.corpus, args.documents, source)
    model_prefix = workdir / f"bpe{args.vocab_size}"
    if not Path(f"{model_prefix}.model").exists():
        timed(
            [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input", str(source),
             "--model-prefix", str(model_prefix), "--vocab-size", str(args.vocab_size)]
        )  # fmt: skip
    common = ["--input", str(source), "--tokenizer-type", "GPTSentencePieceTokenizer",
              "--tokenizer-model", f"{model_prefix}.model", "--append-eod", "--log-interval",
              "1000"]  # fmt: skip
    tools = {"ours": [sys.executable, str(REPO / "tools" / "preprocess_data.py")]}
    if args.megatron_lm_script:
        tools["megatron-lm"] = [sys.executable, __file__, LAUNCHER_FLAG, args.megatron_lm_script]

    input_bytes = source.stat().st_size
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    load_before = os.getloadavg()
    for workers in args.workers:
        for _ in range(args.repeats):
            for tool, command in tools.items():
                prefix = workdir / f"{tool}-w{workers}"
                wall, cpu, output = timed([*command, *common, "--workers", str(workers),
                                           "--output-prefix", str(prefix)])  # fmt: skip
                processing = processing_seconds(tool, output, args.documents)
                results.setdefault((tool, workers), []).append((wall, cpu, processing))
                print(
                    f"{tool} workers={workers}: wall {wall:.2f} s, CPU {cpu:.2f} s, processing "
                    f"{processing:.2f} s, load {os.getloadavg()[0]:.1f}",
                    file=sys.stderr,
                )
        if args.megatron_lm_script:
            same = all(
                filecmp.cmp(workdir / f"ours-w{workers}_text_document{suffix}",
                            workdir / f"megatron-lm-w{workers}_text_document{suffix}",
                            shallow=False)
                for suffix in (".bin", ".idx")
            )  # fmt: skip
            print(f"workers {workers}: outputs byte-identical: {same}", file=sys.stderr)
    tokens = count_tokens(workdir / f"ours-w{args.workers[0]}_text_document")

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    print(f"{args.documents:,} documents, {input_bytes / 1e6:.1f} MB, {tokens:,} tokens; "
          f"{os.cpu_count()} CPUs ({cpu}); Python {platform.python_version()}; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; best of "
          f"{args.repeats}")  # fmt: skip
    print(
        "\n| tool | workers | wall s | CPU s | processing s | docs/s | MB/s | tokens/s "
        "| vs Megatron-LM |\n|---|---|---|---|---|---|---|---|---|"
    )
    for (tool, workers), runs in results.items():
        wall, cpu, processing = (min(run[i] for run in runs) for i in range(3))
        reference = results.get(("megatron-lm", workers))
        speedup = f"{min(run[2] for run in reference) / processing:.2f}x" if reference else "-"
        print(f"| {tool} | {workers} | {wall:.2f} | {cpu:.2f} | {processing:.2f} | "
              f"{args.documents / processing:,.0f} | {input_bytes / processing / 1e6:.1f} | "
              f"{tokens / processing / 1e6:.2f}M | {speedup} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
