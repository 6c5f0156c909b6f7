"""Training-step benchmark: dense vs LPA (and the low-rank ablations) at a named shape, one run.

    python benchmarks/bench_train.py --shape 130m                      # one GPU, every variant
    python benchmarks/bench_train.py --shape 3b --variants dense,lpa --modes fast
    torchrun --nproc-per-node 4 benchmarks/bench_train.py --shape 3b --variants dense,lpa \
        -- --tensor-model-parallel-size 4 --sequence-parallel

Modes: ``baseline`` is megatron-core's own unfused path (``--no-fused-kernels``), ``fused`` adds the
fused kernels and optimizer, ``fast`` also captures each step in a CUDA graph (``--cuda-graph``).

With ``--profile``, it also prints each variant's kernels with the most device time (and their share
of the step), so fusion candidates come from data rather than guesses.

Each variant runs the real training step (``Trainer.train_step``: megatron schedule, DDP, Adam) on
the same random tokens with the same settings; flags after ``--`` are passed to every variant.
Prints a table (step time, tokens/s, model TFLOP/s, MFU, peak memory, step time relative to dense)
and writes it as JSON.
"""

import argparse
import gc
import json
import os
import re
import statistics
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from megatron_lpa.config.command_line import parse_args
from megatron_lpa.config.presets import SHAPES, model_flags, variants
from megatron_lpa.models.flops import training_flops_per_token
from megatron_lpa.platform.distributed import destroy_distributed
from megatron_lpa.training.metrics import DEFAULT_CUDA_PEAK_TFLOPS, memory_gib
from megatron_lpa.training.trainer import Trainer

MODES = {"baseline": ["--no-fused-kernels"], "fused": [], "fast": ["--cuda-graph"]}

# Batch flags per shape: one GPU's worth at 130M; 2 micro-batches of 2 at 3B.
BATCHES = {
    "130m": ["--micro-batch-size", "64", "--global-batch-size", "64"],
    "3b": ["--micro-batch-size", "2", "--global-batch-size", "4"],
    "tiny": ["--micro-batch-size", "4", "--global-batch-size", "4"],
}


def variant_flags(shape: str, variant: str) -> list:
    return (
        model_flags(shape, variant)
        + BATCHES[shape]
        + [
            "--mock-data",
            "--vocab-size",
            "32000",
            "--lr",
            "1e-4",
            "--train-iters",
            "1000000",
            "--eval-iters",
            "0",
            "--hidden-dropout",
            "0",
            "--attention-dropout",
            "0",
            "--log-interval",
            "1000000000",
        ]
        + (["--bf16"] if torch.cuda.is_available() else ["--num-workers", "0"])
    )


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Kernel families by name, so the profile says how much of the step is GEMM, attention and the rest.
KERNEL_FAMILIES = (
    ("attention", re.compile(r"flash|fmha|attn|sdpa|cudnn", re.I)),
    ("GEMM", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|splitk", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|l2norm", re.I)),
)
GEMM_OPS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1)}


# torch.optim's profiling ranges ("Optimizer.step#AdamW.step"); on the device timeline they span
# their kernels, which would count twice. (Kernel names can hold "#" too: "{lambda()#1}".)
OPTIMIZER_RANGE = re.compile(r"^Optimizer\.\w+#")


def kernel_events(prof) -> list:
    """The profile's kernels with device time, averaged by name; not the user annotations (the
    optimizer's step range), which would count their kernels twice."""
    return [
        e
        for e in prof.key_averages()
        if e.self_device_time_total > 0
        and e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not OPTIMIZER_RANGE.match(e.key)
    ]


def print_profile(trainer: Trainer, steps: int, top: int = 25) -> None:
    """Device time per step by kernel family, by GEMM shape (with its TFLOP/s) and top kernels."""
    _sync()
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
    ) as prof:
        for _ in range(steps):
            trainer.train_step()
        _sync()
    kernels = kernel_events(prof)
    total = sum(e.self_device_time_total for e in kernels)
    print(f"device time per step: {total / steps / 1000:.2f} ms")
    families = {}
    for e in kernels:
        family = next((name for name, pattern in KERNEL_FAMILIES if pattern.search(e.key)), "other")
        families[family] = families.get(family, 0) + e.self_device_time_total
    print(
        "  ".join(
            f"{name} {t / steps / 1000:.2f} ms ({100 * t / total:.0f}%)"
            for name, t in sorted(families.items(), key=lambda kv: -kv[1])
        )
    )
    print("GEMMs by shape (M x K x N, calls/step, ms/step, TFLOP/s):")
    for e in sorted(
        prof.key_averages(group_by_input_shape=True),
        key=lambda e: e.device_time_total,
        reverse=True,
    ):
        if e.key not in GEMM_OPS or not e.device_time_total:
            continue
        a, b = (e.input_shapes[i] for i in GEMM_OPS[e.key])
        m, k, n = (a[-2] * (a[0] if len(a) == 3 else 1)), a[-1], b[-1]
        tflops = 2 * m * k * n * e.count / (e.device_time_total * 1e-6) / 1e12
        print(
            f"  {e.key:<11} {m:>7} x {k:>5} x {n:>5} x{e.count // steps:<4d} "
            f"{e.device_time_total / steps / 1000:7.3f} ms {tflops:6.0f}"
        )
    print("top kernels:")
    for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]:
        print(
            f"{100 * e.self_device_time_total / total:5.1f}% "
            f"{e.self_device_time_total / steps / 1000:7.3f} ms x{e.count // steps:<4d} "
            f"{e.key[:100]}"
        )


def measure(flags: list, warmup: int, steps: int, profile_steps: int) -> dict:
    trainer = Trainer(parse_args(flags))
    try:
        result = _time_steps(trainer, warmup, steps, profile_steps)
    finally:
        trainer.close(keep_process_group=True)
        # Free this variant's model and optimizer before the next one allocates its own.
        del trainer
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        result["left_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
    return result


def _step_times(trainer: Trainer, steps: int) -> list:
    """Seconds per step with the steps queued back to back, as in training (the host runs ahead
    of the device): on GPU the time between the ends of consecutive steps on the device's stream,
    on CPU the wall time of each step."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
        return times
    _sync()
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    ends[0].record()
    for end in ends[1:]:
        trainer.train_step()
        end.record()
    _sync()
    return [start.elapsed_time(end) / 1000 for start, end in zip(ends, ends[1:])]


def _time_steps(trainer: Trainer, warmup: int, steps: int, profile_steps: int) -> dict:
    cfg = trainer.cfg
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        trainer.train_step()
    if profile_steps:
        print_profile(trainer, profile_steps)
    times = _step_times(trainer, steps)
    step = statistics.median(times)
    world = dist.get_world_size()
    params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    tokens_per_s = cfg.schedule.global_batch_size * cfg.model.seq_length / step
    tflops = (
        tokens_per_s * training_flops_per_token(trainer.config, cfg.model.seq_length) / 1e12 / world
    )
    peak = cfg.logging.peak_tflops_per_device or (
        DEFAULT_CUDA_PEAK_TFLOPS if torch.cuda.is_available() else None
    )
    return {
        "params_per_rank_m": params / 1e6,
        "step_ms": 1000 * step,
        "step_ms_spread": 1000 * (max(times) - min(times)),
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": memory_gib(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="130m")
    parser.add_argument(
        "--variants", help="comma-separated (default: every variant the shape has a config for)"
    )
    parser.add_argument(
        "--modes", default="baseline,fast", help=f"comma-separated, from {list(MODES)}"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="bench_train.json")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile this many steps per variant (CUDA only)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times, interleaved, and report "
        "the run with the median step time (runs differ by several percent)",
    )
    parser.add_argument("extra", nargs="*", help="flags after -- go to every variant")
    args = parser.parse_args()
    args.variants = args.variants or ",".join(variants(args.shape))
    runs, failed = {}, {}
    for _ in range(args.repeats):
        # Modes outside: a mode that breaks the CUDA context (a failed capture) comes last.
        for mode in args.modes.split(","):
            for variant in args.variants.split(","):
                key = f"{variant}/{mode}"
                if args.profile:
                    print(f"\n== {variant}, {mode} ({args.shape})")
                flags = variant_flags(args.shape, variant) + MODES[mode] + args.extra
                try:
                    result = measure(flags, args.warmup, args.steps, args.profile)
                except Exception as error:  # report it and go on with the other configurations
                    failed[key] = _failure(error)
                    print(f"FAILED {variant}, {mode} ({args.shape}): {failed[key]}", flush=True)
                    destroy_distributed(keep_process_group=True)
                    continue
                runs.setdefault(key, []).append(result)
    destroy_distributed()
    results = {}
    for key, rounds in runs.items():
        rounds.sort(key=lambda r: r["step_ms"])
        results[key] = dict(
            rounds[len(rounds) // 2], step_ms_runs=[round(r["step_ms"], 2) for r in rounds]
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(
        f"\nshape {args.shape}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"median of {args.repeats} run(s), "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    )
    print(
        f"{'variant':<12} {'mode':<9} {'params/rank':>11} {'step ms':>9} {'tokens/s':>11} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'vs dense':>9} {'vs baseline':>11}"
    )
    for key, r in results.items():
        variant, mode = key.split("/")
        dense, baseline = results.get(f"dense/{mode}"), results.get(f"{variant}/baseline")
        r["step_vs_dense"] = r["step_ms"] / dense["step_ms"] if dense else None
        r["step_vs_baseline"] = r["step_ms"] / baseline["step_ms"] if baseline else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratios = [
            f"{x:.3f}" if x is not None else "-"
            for x in (r["step_vs_dense"], r["step_vs_baseline"])
        ]
        print(
            f"{variant:<12} {mode:<9} {r['params_per_rank_m']:>10.1f}M {r['step_ms']:>9.1f} "
            f"{r['tokens_per_s']:>11,.0f} {r['tflops_per_device']:>8.1f} {mfu:>6} "
            f"{r['peak_memory_gib']:>9.1f} {ratios[0]:>9} {ratios[1]:>11}"
        )
    for key, reason in failed.items():
        variant, mode = key.split("/")
        print(f"{variant:<12} {mode:<9} FAILED: {reason}")
    with open(args.output, "w") as f:
        json.dump(
            {"shape": args.shape, "extra_flags": args.extra, "results": results, "failed": failed},
            f,
            indent=1,
        )


def _failure(error: Exception) -> str:
    """What went wrong, by name: out of GPU memory says how much the step wanted of the card."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        return (
            f"out of GPU memory (peak {peak:.1f} GiB allocated of the card's {total:.1f} "
            f"GiB): {str(error).splitlines()[0]}"
        )
    return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    main()
