"""Fused rotary position embedding, plugged into megatron-core's ``apply_rope_fusion`` hook.

megatron-core applies RoPE through ``rope_utils.fused_apply_rotary_pos_emb`` when
``config.apply_rope_fusion`` is set, and fills that hook only from Transformer Engine. Without TE,
``megatron_patches.fused_rope`` fills it with this kernel (``csrc/rope.cu``): one pass instead of
megatron's unfused chunk/negate/cat/multiply/add chain, in both directions.
"""

import torch

from megatron_lpa.ops._ext import kernels_for


def _rope(t: torch.Tensor, angles: torch.Tensor, interleaved: bool, backward: bool):
    if t.stride(-1) != 1:  # the kernel reads strided heads, but contiguous channels
        t = t.contiguous()
    return kernels_for(t).rope(t, angles, interleaved, backward)


class _RotaryEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, angles, interleaved):
        ctx.save_for_backward(angles)
        ctx.interleaved = interleaved
        return _rope(t, angles, interleaved, backward=False)

    @staticmethod
    def backward(ctx, grad):
        (angles,) = ctx.saved_tensors
        return _rope(grad, angles, ctx.interleaved, backward=True), None, None


def fused_apply_rotary_pos_emb(
    t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """RoPE with megatron's hook signature.

    Args:
        t: queries or keys ``[s, b, h, d]`` (a strided view of the fused QKV output is fine).
        freqs: angles ``[s, 1, 1, rot]`` (fp32, ``rot <= d``), as megatron's ``RotaryEmbedding``
            makes.
        interleaved: rotate pairs ``(2i, 2i+1)`` instead of ``(i, i + rot/2)``.

    Returns:
        The rotated ``[s, b, h, d]`` (contiguous); channels past ``rot`` are copied unchanged.
    """
    if freqs.dim() != 4 or freqs.shape[1:3] != (1, 1) or freqs.shape[0] != t.shape[0]:
        raise ValueError(
            f"fused RoPE needs angles [s, 1, 1, rot] for t {tuple(t.shape)}, got "
            f"{tuple(freqs.shape)} (packed or multimodal RoPE is not supported; "
            "run with --no-fused-kernels)."
        )
    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1]).float().contiguous()
    return _RotaryEmbedding.apply(t, angles, interleaved)
