"""Fused SwiGLU as megatron-core's MLP activation slot (``MLPSubmodules.activation_func``).

``csrc/swiglu.cu`` reads ``[gate, up]`` once and writes ``silu(gate) * up``; backward recomputes
``silu`` from the saved input, so only the fc1 output is kept for backward.
"""

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lpa.ops._ext import kernels_for


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return kernels_for(x).swiglu_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return kernels_for(x).swiglu_backward(grad.contiguous(), x)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2f] = [gate, up]`` -> ``silu(gate) * up [..., f]``."""
    return _SwiGLU.apply(x)


class SwiGLU(MegatronModule):
    """The MLP's activation: ``[s, b, 2f/t]`` (this rank's ``[gate, up]``, megatron's fc1 layout)
    -> ``[s, b, f/t]``. Built by megatron's MLP from the spec when ``use_te_activation_func`` is
    on."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)
