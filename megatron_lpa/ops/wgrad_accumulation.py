"""Weight gradients accumulated straight into megatron's fp32 ``main_grad`` (gradient-accumulation
fusion).

Without it, each linear's weight-gradient GEMM writes a bf16 ``param.grad`` and megatron's DDP hook
then adds it into the fp32 ``main_grad`` buffer: a second pass over every weight per micro-batch
(27 ms of a 390 ms 3B step on one H200, ``BENCHMARKS.md``). megatron-core fuses the two when
``config.gradient_accumulation_fusion`` is set, but takes the GEMM from apex's
``fused_weight_gradient_mlp_cuda``. This module has that module's two functions, built on torch's
mixed-precision ``addmm`` (bf16/fp16 inputs, fp32 accumulate and output, ``beta=1``), and
``megatron_patches.wgrad_accumulation`` hands them to megatron's linear layers.
"""

import torch


def wgrad_gemm_accum_fp32(
    input_: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
) -> None:
    """``main_grad += grad_output^T @ input_`` with fp32 accumulation, in place.

    Args:
        input_: ``[tokens, in]`` (bf16, fp16 or fp32), the layer's input.
        grad_output: ``[tokens, out]``, same dtype, the gradient of the layer's output.
        main_grad: ``[out, in]`` fp32, megatron's gradient buffer view for the weight.
    """
    if main_grad.is_cuda and input_.dtype != torch.float32:
        torch.addmm(main_grad, grad_output.t(), input_, out_dtype=torch.float32, out=main_grad)
    else:  # the same sum without torch's CUDA-only mixed-dtype GEMM
        main_grad.addmm_(grad_output.t().float(), input_.float())


def wgrad_gemm_accum_fp16(
    input_: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
) -> None:
    """``main_grad += grad_output^T @ input_`` for a bf16/fp16 ``main_grad`` of the inputs'
    dtype."""
    main_grad.addmm_(grad_output.t(), input_)
