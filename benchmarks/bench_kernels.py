"""Microbenchmark of each fused kernel (forward + backward) against the PyTorch path it replaces.

    python benchmarks/bench_kernels.py --output bench_kernels.json

Shapes are one micro-batch of the 130M (seq 256 x 64) and 3B (seq 2048 x 2) benchmark models.
"Megatron" is megatron-core 0.16.1's own unfused path in bf16: ``vocab_parallel_cross_entropy``,
``_apply_rotary_pos_emb_bshd`` (rotate_half), the MLP's chunk/silu/multiply, and torch's RMSNorm
(what megatron's norm slot runs without Transformer Engine). Times are device time
(the kernels' durations from the profiler, mean over rotating input sets); GB/s counts the fewest
bytes the op must move.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from bench_train import kernel_events
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from torch.profiler import ProfilerActivity, profile

from megatron_lpa.ops.cross_entropy import vocab_parallel_cross_entropy
from megatron_lpa.ops.rms_norm import rms_norm
from megatron_lpa.ops.rope import fused_apply_rotary_pos_emb
from megatron_lpa.ops.swiglu import swiglu
from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed

SHAPES = {
    "130m": dict(seq=256, batch=64, hidden=768, heads=12, ffn=2048),
    "3b": dict(seq=2048, batch=2, hidden=3072, heads=24, ffn=8192),
}
VOCAB = 32000
BF16 = 2


def device_ms(fn, inputs: list, repeats: int = 20) -> float:
    """Mean device time of ``fn(*inputs[i % len(inputs)])``: its kernels' durations as the profiler
    records them, summed. That is what the op costs inside a CUDA-graphed training step; the host's
    launch overhead, which exceeds the kernels at these sizes when timed call by call, is left
    out."""
    for i in range(3):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(repeats):
            fn(*inputs[i % len(inputs)])
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in kernel_events(prof)) / repeats / 1000


def forward_backward(op):
    """fwd + bwd of ``op(x, *rest)`` with an upstream gradient ``grad``."""

    def run(x, grad, *rest):
        x.grad = None
        op(x, *rest).backward(grad)

    return run


def cross_entropy_case(s):
    rows = s["seq"] * s["batch"]
    inputs = []
    for _ in range(2):
        logits = torch.randn(s["seq"], s["batch"], VOCAB, device="cuda", dtype=torch.bfloat16)
        labels = torch.randint(0, VOCAB, (s["seq"], s["batch"]), device="cuda")
        inputs.append(
            (logits.requires_grad_(), torch.randn(s["seq"], s["batch"], device="cuda"), labels)
        )
    ops = {
        "megatron": lambda x, labels: tensor_parallel.vocab_parallel_cross_entropy(x, labels),
        "fused": lambda x, labels: vocab_parallel_cross_entropy(x, labels, None),
    }
    # fwd reads the logits; bwd reads them and writes their gradient.
    return inputs, ops, 3 * rows * VOCAB * BF16


def rope_case(s):
    head_dim = s["hidden"] // s["heads"]
    inputs = []
    for _ in range(3):
        qkv = torch.randn(
            s["seq"], s["batch"], s["heads"], 3 * head_dim, device="cuda", dtype=torch.bfloat16
        )
        query = qkv[..., :head_dim].requires_grad_()  # strided, as megatron's attention has it
        angles = torch.arange(s["seq"], device="cuda")[:, None] * torch.rand(
            head_dim // 2, device="cuda"
        )
        freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]
        inputs.append((query, torch.randn_like(query), freqs))
    ops = {
        "megatron": lambda x, freqs: _apply_rotary_pos_emb_bshd(x, freqs),
        "fused": lambda x, freqs: fused_apply_rotary_pos_emb(x, freqs),
    }
    elements = s["seq"] * s["batch"] * s["hidden"]
    return inputs, ops, 4 * elements * BF16  # each way: read + write


def _megatron_glu(x):
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def swiglu_case(s):
    inputs = []
    for _ in range(3):
        x = torch.randn(
            s["seq"],
            s["batch"],
            2 * s["ffn"],
            device="cuda",
            dtype=torch.bfloat16,
            requires_grad=True,
        )
        inputs.append(
            (x, torch.randn(s["seq"], s["batch"], s["ffn"], device="cuda", dtype=torch.bfloat16))
        )
    elements = s["seq"] * s["batch"] * s["ffn"]
    # fwd: read 2f, write f; bwd: read f and 2f, write 2f.
    return inputs, {"megatron": _megatron_glu, "fused": swiglu}, 8 * elements * BF16


def rms_norm_case(s):
    inputs = []
    for _ in range(3):
        x = torch.randn(
            s["seq"],
            s["batch"],
            s["hidden"],
            device="cuda",
            dtype=torch.bfloat16,
            requires_grad=True,
        )
        weight = torch.randn(s["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        inputs.append((x, torch.randn_like(x), weight))
    ops = {
        "megatron": lambda x, w: F.rms_norm(x, w.shape, w, 1e-5),  # torch.nn.RMSNorm's call
        "fused": lambda x, w: rms_norm(x, w, 1e-5),
    }
    # fwd: read x, write y; bwd: read x and dy, write dx (the weight and its gradient are small).
    return inputs, ops, 5 * s["seq"] * s["batch"] * s["hidden"] * BF16


CASES = {
    "cross_entropy": cross_entropy_case,
    "rope": rope_case,
    "swiglu": swiglu_case,
    "rms_norm": rms_norm_case,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--output", default="bench_kernels.json")
    args = parser.parse_args()
    initialize_distributed()  # megatron's cross-entropy reads the TP group
    rows = []
    for shape in args.shapes:
        for name, case in CASES.items():
            inputs, ops, min_bytes = case(SHAPES[shape])
            times = {
                impl: device_ms(
                    forward_backward(op), [(x, grad, *rest) for x, grad, *rest in inputs]
                )
                for impl, op in ops.items()
            }
            rows.append(
                {
                    "shape": shape,
                    "op": name,
                    "megatron_ms": times["megatron"],
                    "fused_ms": times["fused"],
                    "speedup": times["megatron"] / times["fused"],
                    "fused_gb_s": min_bytes / times["fused"] / 1e6,
                }
            )
            del inputs
            torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, bf16, forward + backward, device ms")
    print(
        f"{'shape':<6} {'op':<14} {'megatron':>9} {'fused':>8} {'speed-up':>9} {'fused GB/s':>11}"
    )
    for r in rows:
        print(
            f"{r['shape']:<6} {r['op']:<14} {r['megatron_ms']:>9.3f} {r['fused_ms']:>8.3f} "
            f"{r['speedup']:>8.2f}x {r['fused_gb_s']:>11.0f}"
        )
    with open(args.output, "w") as f:
        json.dump(rows, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main()
