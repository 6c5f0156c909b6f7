"""Curves and a table from the ``--log-jsonl`` records of ``tools/wiki_experiment.py`` runs.

    python tools/plot_experiment.py docs/results --tokens-per-step 65536

Reads every ``<variant>_seed<n>.jsonl`` in the folder and writes ``valid_ppl_vs_tokens.png``,
``valid_ppl_vs_time.png`` (the four variants), ``valid_ppl_sweep.png`` (rank and learning-rate
runs beside dense and LPA, if any) and prints a Markdown table: final validation perplexity (mean over
seeds, and each seed), median tokens/s, peak memory, training time, and the time each variant needed
to reach dense's final perplexity.
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_runs(folder: Path) -> dict:
    """{variant: {seed: [records]}} from ``<variant>_seed<seed>.jsonl`` files."""
    runs = defaultdict(dict)
    for path in sorted(folder.glob("*_seed*.jsonl")):
        variant, seed = path.stem.rsplit("_seed", 1)
        runs[variant][int(seed)] = [json.loads(line) for line in path.read_text().splitlines()]
    return runs


def validation(records: list) -> list:
    return [r for r in records if r["split"] == "validation"]


def time_to_reach(records: list, target_ppl: float):
    for r in validation(records):
        if r["ppl"] <= target_ppl:
            return r["elapsed_s"]
    return None


def plot(runs: dict, variants: list, x_key: str, tokens_per_step: int, path: Path) -> None:
    """Validation perplexity of ``variants`` (every seed) against tokens or wall-clock time."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, variant in enumerate(variants):
        for seed, records in sorted(runs[variant].items()):
            points = validation(records)
            xs = [p[x_key] * (tokens_per_step / 1e6 if x_key == "iteration" else 1)
                  for p in points]
            ax.plot(xs, [p["ppl"] for p in points], label=f"{variant} seed {seed}",
                    color=f"C{color}", linestyle="-" if seed == min(runs[variant]) else "--")
    ax.set_xlabel("training tokens (M)" if x_key == "iteration" else "wall-clock seconds")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--tokens-per-step", type=int, required=True)
    args = parser.parse_args()
    folder = Path(args.folder)
    runs = load_runs(folder)
    order = [v for v in ("dense", "lpa", "lowrank_ffn", "lowrank_all") if v in runs]
    # Other runs (rank sweep <variant>_r<rank>, learning rates <variant>_lr<lr>) get their own plot.
    extra = sorted(v for v in runs if v not in order)
    plots = [(order, "iteration", "valid_ppl_vs_tokens.png"),
             (order, "elapsed_s", "valid_ppl_vs_time.png")]
    if extra:
        plots.append((["dense", "lpa"] + extra, "iteration", "valid_ppl_sweep.png"))
    for variants, x_key, name in plots:
        plot(runs, variants, x_key, args.tokens_per_step, folder / name)

    dense_final = statistics.mean(validation(r)[-1]["ppl"] for r in runs["dense"].values())
    print("| variant | final valid ppl (mean) | per seed | tokens/s (median) | peak GiB | "
          "train time s | time to dense's final ppl |")
    print("|---|---|---|---|---|---|---|")
    for variant in order + extra:
        finals = {s: validation(r)[-1]["ppl"] for s, r in sorted(runs[variant].items())}
        train = [r for recs in runs[variant].values() for r in recs if r["split"] == "train"]
        speeds = [r["tokens-per-sec"] for r in train[1:]]  # the first window includes start-up
        elapsed = statistics.mean(recs[-1]["elapsed_s"] for recs in runs[variant].values())
        reached = [time_to_reach(r, dense_final) for r in runs[variant].values()]
        reach = ("never" if any(t is None for t in reached)
                 else f"{statistics.mean(reached):.0f} s")
        print(f"| {variant} | {statistics.mean(finals.values()):.2f} | "
              + ", ".join(f"{p:.2f}" for p in finals.values())
              + f" | {statistics.median(speeds):,.0f} | {max(r['memory-gib'] for r in train):.1f} "
              f"| {elapsed:.0f} | {reach} |")


if __name__ == "__main__":
    main()
