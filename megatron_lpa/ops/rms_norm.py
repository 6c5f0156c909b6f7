"""Fused RMSNorm for the LLaMA-style norm slots (``input_layernorm``, ``pre_mlp_layernorm``, final).

``csrc/rms_norm.cu`` normalises a row per block pass and, in backward, writes the input gradient and
per-block partial weight gradients in one read of x and dy; torch's RMSNorm spends a second, slower
kernel on the weight gradient. Only the fp32 ``rstd [rows]`` is kept beside the input for backward.
Rows the kernels cannot hold (not whole 16-byte vectors, or wider than 2048 of them) run the PyTorch
version in ``reference.py``.
"""

import torch

from megatron_lpa.ops import reference
from megatron_lpa.ops._ext import kernels_for

MAX_VECTORS = 2048
"""Widest row ``csrc/rms_norm.cu`` holds, in 16-byte vectors (16384 bf16 elements)."""


def _ops_for(*tensors: torch.Tensor):
    """The kernels for these ``[rows, n]`` / ``[n]`` tensors of one dtype when their rows are
    whole, aligned 16-byte vectors and at most ``MAX_VECTORS`` of them; else the PyTorch version."""
    per_vector = 16 // tensors[0].element_size()
    width = tensors[0].shape[-1]
    fits = (
        width % per_vector == 0
        and width // per_vector <= MAX_VECTORS
        and all(t.data_ptr() % 16 == 0 and t.dtype == tensors[0].dtype for t in tensors)
    )
    return kernels_for(tensors[0]) if fits else reference


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = _ops_for(rows, weight).rms_norm_forward(rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, rstd = ctx.saved_tensors
        grad_rows = grad.reshape(rows.shape).contiguous()
        dx, dw = _ops_for(rows, grad_rows, weight).rms_norm_backward(grad_rows, rows, weight, rstd)
        return dx.view(grad.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., h] * rsqrt(mean(x^2) + eps) * weight [h]``, in the dtype of ``x``."""
    return _RMSNorm.apply(x, weight, eps)


class FusedRMSNorm(torch.nn.Module):
    """``torch.nn.RMSNorm`` (same ``weight``, same checkpoint keys) on the fused kernels.

    ``forward(x)``: ``x [..., h]`` (megatron's ``[s(/t), b, h]``) -> same shape and dtype.
    """

    def __init__(self, hidden_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
