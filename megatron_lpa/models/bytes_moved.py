"""HBM bytes and FLOPs of each kernel of one transformer layer's training step, and their bounds.

A roofline lower bound per kernel: ``max(flops / peak, bytes / bandwidth)``. It counts what each
kernel must read and write at least once (activations and weights in the training dtype, weight
gradients accumulated into fp32 ``main_grad``: read and written), so a measured kernel time over
this bound says how far the kernel is from the hardware, and the sum over a layer says how much
LPA can gain over dense at a given shape. At 130M (d=768, r=128) the low-rank GEMMs sit far below
the FLOP/byte ridge of an H100 or H200: their bound is the bytes, not the FLOPs, which is why the
FLOP ideal (``models/flops.py``) overstates LPA's possible speed-up.

Kernels counted per layer, forward and backward: each projection's GEMMs (a low-rank slot is two
GEMMs with the ``[tokens, r]`` activation between them; backward is an input-gradient and a
weight-gradient GEMM per factor), the two norms, RoPE on Q and K, flash attention, the FFN
activation and the two residual adds. Dropout, the embedding and the output head are left out (the
same for every variant at a shape).
"""

from dataclasses import dataclass

from megatron_lpa.models.lpa_config import LPAConfig

# (bf16 dense tensor-core peak FLOP/s, HBM bandwidth B/s), from the vendors' data sheets (SXM).
CARDS = {"h100": (989e12, 3.35e12), "h200": (989e12, 4.8e12)}


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float

    def bound_s(self, peak_flops: float, bandwidth: float) -> float:
        """Roofline lower bound of this kernel's time, seconds."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def _gemm(name: str, m: int, k: int, n: int, act: int) -> list:
    """Forward, input-gradient and weight-gradient GEMMs of ``y[m, n] = x[m, k] W[k, n]``."""
    flops = 2.0 * m * k * n
    weight_grad_bytes = 2 * 4 * k * n  # fp32 main_grad, read and written
    return [
        Kernel(f"{name} fwd", flops, act * (m * k + k * n + m * n)),
        Kernel(f"{name} dgrad", flops, act * (m * n + k * n + m * k)),
        Kernel(f"{name} wgrad", flops, act * (m * n + m * k) + weight_grad_bytes),
    ]


def _projection(name: str, tokens: int, d_in: int, d_out: int, rank: int, act: int) -> list:
    if not rank:
        return _gemm(name, tokens, d_in, d_out, act)
    return _gemm(f"{name}.A", tokens, d_in, rank, act) + _gemm(
        f"{name}.B", tokens, rank, d_out, act
    )


def _elementwise(
    name: str, reads: int, writes: int, backward_reads: int, backward_writes: int, act: int
) -> list:
    return [
        Kernel(f"{name} fwd", 0.0, act * (reads + writes)),
        Kernel(f"{name} bwd", 0.0, act * (backward_reads + backward_writes)),
    ]


def layer_kernels(config: LPAConfig, micro_batch: int, seq_length: int, act_bytes: int = 2) -> list:
    """Every counted kernel of one layer's forward and backward for a ``[seq, batch]``
    micro-batch."""
    t, d = micro_batch * seq_length, config.hidden_size
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    q_width, kv_width = heads * config.kv_channels, groups * config.kv_channels
    attn_rank, ffn_rank, ffn = config.lpa_attn_rank, config.lpa_ffn_rank, config.ffn_hidden_size
    kernels = []
    for norm in ("input norm", "pre-FFN norm"):  # x and dy in, normalised x or dx out
        kernels += _elementwise(norm, t * d, t * d, 2 * t * d, t * d, act_bytes)
    kernels += _projection("q", t, d, q_width, attn_rank, act_bytes)
    kernels += _projection("k", t, d, kv_width, attn_rank, act_bytes)
    kernels += _projection("v", t, d, kv_width, attn_rank, act_bytes)
    if config.position_embedding_type == "rope":
        qk = t * (q_width + kv_width)
        kernels += _elementwise("rope q,k", qk, qk, qk, qk, act_bytes)
    causal_flops = 4.0 * t * seq_length * q_width / 2
    kernels += [
        Kernel("attention fwd", causal_flops, act_bytes * t * (2 * q_width + 2 * kv_width)),
        # Reads q, k, v, o, do; writes dq, dk, dv; recomputes the scores (2.5x the forward's FLOPs).
        Kernel(
            "attention bwd",
            2.5 * causal_flops,
            act_bytes * t * (3 * q_width + 2 * kv_width + 2 * kv_width + q_width),
        ),
    ]
    kernels += _projection("o", t, q_width, d, attn_rank, act_bytes)
    fc1_width = 2 * ffn if config.gated_linear_unit else ffn
    kernels += _projection("fc1", t, d, fc1_width, ffn_rank, act_bytes)
    kernels += _elementwise(
        "activation", t * fc1_width, t * ffn, t * (fc1_width + ffn), t * fc1_width, act_bytes
    )
    kernels += _projection("fc2", t, ffn, d, ffn_rank, act_bytes)
    for residual in ("attention residual", "FFN residual"):  # backward: the gradient passes through
        kernels += [Kernel(f"{residual} fwd", 0.0, act_bytes * 3 * t * d)]
    return kernels


def layer_bound_s(config: LPAConfig, micro_batch: int, seq_length: int, card: str) -> float:
    """Sum of the kernels' roofline bounds for one layer on ``card`` (a key of ``CARDS``)."""
    peak, bandwidth = CARDS[card]
    return sum(k.bound_s(peak, bandwidth) for k in layer_kernels(config, micro_batch, seq_length))
