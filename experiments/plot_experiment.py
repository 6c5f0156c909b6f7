"""Curves and tables from a folder of ``experiments/wiki_experiment.py`` runs.

    python experiments/plot_experiment.py docs/results/2026-12-06

Runs are grouped by their tag (``<variant>_<tag>_seed<n>``). For each group it writes
``<tag>_ppl_vs_tokens.png`` and ``<tag>_ppl_vs_time.png`` (validation perplexity of every run),
``<tag>_gap.png`` when the group repeats its data (validation minus training loss: who overfits
first), and prints a Markdown table: final perplexity and bits per byte on the whole held-out
shard (tools/evaluate.py on the final checkpoint; mean over seeds and each seed), median training
tokens/s, peak memory, training time and the time each variant needed to reach dense's final
validation perplexity.
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ("dense", "lpa", "lowrank_ffn", "lowrank_all")


def load_groups(folder: Path) -> dict:
    """{tag: {variant: {seed: run}}}; a run holds its records, its final evaluation and settings."""
    groups = defaultdict(lambda: defaultdict(dict))
    for log in sorted(folder.glob("*_seed*.jsonl")):
        name, seed = log.stem.rsplit("_seed", 1)
        variant = next(
            (
                v
                for v in sorted(ORDER, key=len, reverse=True)
                if name == v or name.startswith(v + "_")
            ),
            None,
        )
        evaluation, settings = (folder / f"{log.stem}_{kind}.json" for kind in ("eval", "run"))
        if variant is None or not evaluation.exists():
            continue
        groups[name[len(variant) + 1 :]][variant][int(seed)] = {
            "records": [json.loads(line) for line in log.read_text().splitlines()],
            "eval": next(iter(json.loads(evaluation.read_text())["datasets"].values())),
            "run": json.loads(settings.read_text()),
        }
    return groups


def split(run: dict, name: str) -> list:
    return [r for r in run["records"] if r["split"] == name]


def plot_curves(variants: dict, x_key: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, (variant, seeds) in enumerate(variants.items()):
        for seed, run in sorted(seeds.items()):
            points = split(run, "validation")
            scale = run["run"]["tokens_per_step"] / 1e6 if x_key == "iteration" else 1
            ax.plot(
                [p[x_key] * scale for p in points],
                [p["ppl"] for p in points],
                label=f"{variant} seed {seed}",
                color=f"C{color}",
                linestyle="-" if seed == min(seeds) else "--",
            )
    ax.set_xlabel("training tokens (M)" if x_key == "iteration" else "wall-clock seconds")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gap(variants: dict, path: Path) -> None:
    """Validation loss minus the training loss logged nearest before it, against tokens."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, (variant, seeds) in enumerate(variants.items()):
        for seed, run in sorted(seeds.items()):
            train, tokens_per_step = split(run, "train"), run["run"]["tokens_per_step"]
            xs, gaps = [], []
            for point in split(run, "validation"):
                before = [t for t in train if t["iteration"] <= point["iteration"]]
                if before:
                    xs.append(point["iteration"] * tokens_per_step / 1e6)
                    gaps.append(point["lm loss"] - before[-1]["lm loss"])
            ax.plot(xs, gaps, label=f"{variant} seed {seed}", color=f"C{color}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss - training loss (nats)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_to_reach(run: dict, target_ppl: float):
    return next((r["elapsed_s"] for r in split(run, "validation") if r["ppl"] <= target_ppl), None)


def table(variants: dict) -> list:
    dense_final = statistics.mean(
        split(run, "validation")[-1]["ppl"] for run in variants["dense"].values()
    )
    lines = [
        "| variant | final ppl (mean) | per seed | bits/byte (mean) | per seed | tokens/s "
        "(median) | peak GiB | train time s | time to dense's final ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, seeds in variants.items():
        ppl = {s: run["eval"]["perplexity"] for s, run in sorted(seeds.items())}
        bpb = {s: run["eval"]["bits_per_byte"] for s, run in sorted(seeds.items())}
        train = [r for run in seeds.values() for r in split(run, "train")]
        speeds = [r["tokens-per-sec"] for r in train[1:]]  # the first window includes start-up
        elapsed = statistics.mean(split(run, "train")[-1]["elapsed_s"] for run in seeds.values())
        reached = [time_to_reach(run, dense_final) for run in seeds.values()]
        reach = "never" if None in reached else f"{statistics.mean(reached):.0f} s"
        lines.append(
            f"| {variant} | {statistics.mean(ppl.values()):.2f} | "
            + ", ".join(f"{p:.2f}" for p in ppl.values())
            + f" | {statistics.mean(bpb.values()):.4f} | "
            + ", ".join(f"{b:.4f}" for b in bpb.values())
            + f" | {statistics.median(speeds):,.0f} | {max(r['memory-gib'] for r in train):.1f} "
            f"| {elapsed:.0f} | {reach} |"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    args = parser.parse_args()
    folder = Path(args.folder)
    for tag, variants in sorted(load_groups(folder).items()):
        variants = {v: variants[v] for v in ORDER if v in variants}
        plot_curves(variants, "iteration", folder / f"{tag}_ppl_vs_tokens.png")
        plot_curves(variants, "elapsed_s", folder / f"{tag}_ppl_vs_time.png")
        if any(run["run"]["epochs"] > 1 for seeds in variants.values() for run in seeds.values()):
            plot_gap(variants, folder / f"{tag}_gap.png")
        print(f"\n### {tag}\n")
        print("\n".join(table(variants)))


if __name__ == "__main__":
    main()
