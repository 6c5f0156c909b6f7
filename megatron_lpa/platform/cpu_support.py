"""megatron-core on a CPU-only PyTorch (gloo): the only place that bends megatron-core for CPUs.

megatron-core 0.16.1 assumes CUDA in a few fixed ways. ``enable_cpu_support()`` covers each, and
refuses to run when CUDA is available, so nothing here is ever active on a GPU:

===============================================  ===================================================
megatron-core call site                          what this module does on CPU
===============================================  ===================================================
``torch.cuda.current_device()`` (~175 sites:     returns ``"cpu"``; a patch of the function, because
attention buffers, RoPE, DDP grad buffers, the   some sites run inside autograd's backward where
SP gathers in backward, ...)                     Python TorchFunctionModes are not active
``torch.cuda.synchronize()`` in                  no-op (gloo is synchronous)
``pipeline_parallel/p2p_communication.py``
``tensor_parallel/random.py``: RNG tracker       the "CUDA" RNG is the CPU generator: ``add`` seeds
(``CudaRNGStatesTracker.add/fork``,              and snapshots it, ``fork`` swaps it, so per-TP-rank
``_get/_set_cuda_rng_state``,                    dropout streams keep working
``model_parallel_cuda_manual_seed``)            ``fork``'s warning "CPU RNG state changed within
                                                 GPU RNG context" is expected here and filtered
``device="cuda"`` literals and ``.cuda()``:      these functions run under ``_CudaToCpuMode``, which
``schedules.forward_backward_*``                 rewrites the device to CPU and makes
(``total_num_tokens``),                          ``Tensor.type()`` answer ``torch.cuda.*Tensor``
``fused_softmax.get_default_causal_mask``,       for the dtype checks
``optimizer.{get_grad_norm_fp32,
clip_grad_by_total_norm_fp32, count_zeros_fp32}``
(incl. the ``torch.cuda.FloatTensor`` assert),
optimizer and grad-scaler constructors
(``found_inf``, scales, dtype checks),
``LanguageModule.setup_embeddings_and_output_
layer`` (tied embeddings under PP)
===============================================  ===================================================
"""

import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpuMode(TorchFunctionMode):
    """Runs megatron-core code written for CUDA tensors on CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return (
                name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            )
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    return wrapper


def _patch_cuda_literals():
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import distrib_optimizer, grad_scaler, optimizer
    from megatron.core.pipeline_parallel import schedules

    functions = {
        schedules: (
            "forward_backward_no_pipelining",
            "forward_backward_pipelining_without_interleaving",
            "forward_backward_pipelining_with_interleaving",
        ),
        fused_softmax: ("get_default_causal_mask",),
        optimizer: ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"),
    }
    for module, names in functions.items():
        for name in names:
            setattr(module, name, _on_cpu(getattr(module, name)))
    classes = (
        optimizer.MixedPrecisionOptimizer,
        optimizer.Float16OptimizerWithFloat16Params,
        optimizer.FP32Optimizer,
        distrib_optimizer.DistributedOptimizer,
        grad_scaler.MegatronGradScaler,
        grad_scaler.ConstantGradScaler,
        grad_scaler.DynamicGradScaler,
    )
    for cls in classes:
        cls.__init__ = _on_cpu(cls.__init__)
    LanguageModule.setup_embeddings_and_output_layer = _on_cpu(
        LanguageModule.setup_embeddings_and_output_layer
    )


def _patch_rng():
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(
        new_state
    )
    # fork() checks that the CPU generator is untouched inside a "GPU" stream; here they are one.
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )


def enable_cpu_support() -> None:
    """Makes megatron-core run on CPU tensors with gloo. Idempotent; refuses when CUDA is usable."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "CPU support for megatron-core is for machines without CUDA; this one "
            "has a GPU, so run on it (the CPU patches are never applied on GPUs)."
        )
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    _patch_rng()
    _patch_cuda_literals()
    _enabled = True
