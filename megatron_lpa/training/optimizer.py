"""megatron-core's optimizer and LR schedule for a run, and the optimizer step the trainer takes.

Without Transformer Engine or apex, megatron-core steps torch's ``AdamW`` in its foreach mode
(about ten passes over the fp32 master weights and moments) and takes the gradient norm one tensor
at a time, each copied to the host. With the fused kernels (the default) the AdamW is torch's
fused kernel (one pass), megatron's multi-tensor hooks get torch's foreach kernels
(``megatron_patches.use_multi_tensor_kernels``), and ``step_without_host_sync`` runs the rest of
megatron's step with no host round trip: the gradient norm stays on the device, and clipping and
the skip of a non-finite step reach the fused kernel as its ``grad_scale`` and ``found_inf``
tensors (the ones torch's AMP uses). The host then queues the next step while the device still
runs this one, which at 130M is worth more than any kernel (``BENCHMARKS.md``). None of this
changes the arithmetic beyond rounding order.
"""

import math
from typing import Tuple

import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_lpa.config.training_config import TrainingConfig
from megatron_lpa.platform import megatron_patches
from megatron_lpa.platform.distributed import device_type


def build_optimizer(cfg: TrainingConfig, model: list):
    """megatron's (distributed, with ``--use-distributed-optimizer``) AdamW over ``model``."""
    opt, compute = cfg.optimizer, cfg.compute
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=cfg.schedule.lr,
            min_lr=cfg.schedule.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=compute.bf16,
            fp16=compute.fp16,
            params_dtype=compute.params_dtype,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
        ),
        model,
    )


def build_scheduler(cfg: TrainingConfig, optimizer) -> OptimizerParamScheduler:
    """megatron's LR schedule: linear warm-up, then the decay style, constant weight decay."""
    schedule = cfg.schedule
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=schedule.lr,
        min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.warmup_steps,
        lr_decay_steps=schedule.decay_steps,
        lr_decay_style="WSD" if schedule.lr_decay_style == "wsd" else schedule.lr_decay_style,
        start_wd=cfg.optimizer.weight_decay,
        end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=schedule.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=schedule.lr_wsd_decay_iters,
        lr_wsd_decay_style=schedule.lr_wsd_decay_style,
    )


def _torch_optimizers(optimizer):
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if part.optimizer is not None:
            yield part.optimizer


def use_fused_kernels(optimizer, enabled: bool = True) -> None:
    """Fused AdamW and foreach grad-norm/clip kernels for ``optimizer`` (megatron's), or, with
    ``enabled=False``, megatron-core's own paths. Idempotent; call it again after loading
    optimizer state, which may bring Adam's step counters back on the CPU."""
    megatron_patches.use_multi_tensor_kernels(enabled)
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam):
            continue
        for group in [inner.defaults, *inner.param_groups]:
            group["fused"], group["foreach"] = (True, False) if enabled else (None, None)
        if not enabled:
            # torch's foreach AdamW refuses the tensors step_without_host_sync leaves behind.
            inner.grad_scale = inner.found_inf = None
            continue
        for param, state in inner.state.items():
            step = state.get("step")
            if torch.is_tensor(step) and step.device != param.device:
                # The fused kernel reads the step count on the parameter's device.
                state["step"] = step.to(param.device, torch.float32)


@torch.no_grad()
def step_without_host_sync(optimizer, clip_grad: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """megatron's optimizer step after ``prepare_grads``, decided on the device.

    The norm is megatron's ``get_grad_norm`` (same gradients, same reduction groups) without its
    ``.item()``. Clipping (``clip_grad > 0``) divides the gradients by ``max(1, norm / clip_grad)``
    inside the AdamW kernel, which saves megatron's separate pass over them; a non-finite norm makes
    the kernel leave parameters, moments and step counts as they were. Needs the fused AdamW of
    ``use_fused_kernels``.

    Returns the gradient norm and whether the step was skipped, both 0-dim tensors on the device.
    """
    squares = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        grads = part.get_main_grads_for_grad_norm()
        square = (
            torch.stack(torch._foreach_norm(grads)).square().sum()
            if grads
            else torch.zeros((), device=device_type())
        )
        # Every rank joins the reduction, with or without gradients of its own.
        dist.all_reduce(square, group=part.get_grad_stats_parallel_group())
        squares.append(square)
    grad_norm = torch.stack(squares).sum().sqrt()
    skipped = ~torch.isfinite(grad_norm)
    grad_scale = (grad_norm + 1.0e-6).div(clip_grad).clamp(min=1.0) if clip_grad > 0 else None
    for inner in _torch_optimizers(optimizer):
        if not (isinstance(inner, torch.optim.Adam) and inner.defaults["fused"]):
            raise RuntimeError(
                "step_without_host_sync needs torch's fused AdamW; call "
                "use_fused_kernels(optimizer) first."
            )
        inner.grad_scale, inner.found_inf = grad_scale, skipped.float()
    optimizer.step_with_ready_grads()
    return grad_norm, skipped


@torch.no_grad()
def optimizer_step(optimizer, clip_grad: float, fused: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """megatron's optimizer step, skipped when the gradient norm is not finite.

    Returns the gradient norm and whether the step was skipped, 0-dim tensors on the device.
    The norm megatron computes for clipping is the check (a non-finite loss gives non-finite
    gradients); every rank gets the same norm. With ``fused`` nothing here waits for the device
    (``step_without_host_sync``); megatron's own path reads the norm on the host, as megatron
    does. With fp16, megatron's loss scaler also skips (and lowers its scale) when the scaled
    gradients overflow.
    """
    device = device_type()
    if optimizer.prepare_grads():
        return (
            torch.full((), math.nan, device=device),
            torch.ones((), dtype=torch.bool, device=device),
        )
    if fused:
        return step_without_host_sync(optimizer, clip_grad)
    grad_norm = optimizer.get_grad_norm()
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        if clip_grad > 0:
            for part in getattr(optimizer, "chained_optimizers", [optimizer]):
                params = part.get_parameters()
                if params:
                    # Looked up on the module at call time: CPU support wraps it there.
                    mcore_optimizer.clip_grad_by_total_norm_fp32(
                        params,
                        clip_grad,
                        grad_norm,
                        part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                    )
        optimizer.step_with_ready_grads()
    return (
        torch.full((), grad_norm, device=device),
        torch.full((), skipped, dtype=torch.bool, device=device),
    )
