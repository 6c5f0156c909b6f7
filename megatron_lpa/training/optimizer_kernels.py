"""Fast kernels for megatron-core's optimizer step when neither Transformer Engine nor apex is there.

Without them megatron-core steps torch's ``AdamW`` in its default (foreach) mode, about ten passes
over the fp32 master weights and moments, and its fallback grad norm (``local_multi_tensor_l2_norm``)
takes one norm per tensor and copies each to the host. ``use_fast_optimizer_kernels`` switches the
AdamW to torch's fused kernel (one pass) and fills megatron's multi-tensor hooks, which it otherwise
takes from apex or TE, with torch's foreach kernels (no host round trip until megatron's one
``.item()``). It changes no arithmetic beyond rounding order.

``step_without_host_sync`` then runs the rest of megatron's step (after ``prepare_grads``) with no
host round trip at all: the gradient norm stays on the device, and clipping and the skip of a
non-finite step reach the fused kernel as its ``grad_scale`` and ``found_inf`` tensors (the ones
torch's AMP uses). The host can then queue the next step while the device still runs this one,
which at 130M is worth more than any kernel (``BENCHMARKS.md``).
"""

from typing import Tuple

import torch
import torch.distributed as dist
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mcore_optimizer

from megatron_lpa.platform.distributed import device_type


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """apex's ``multi_tensor_l2norm`` contract: ``(norm of all tensors [1], None)``."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """apex's ``multi_tensor_scale`` contract: ``dst = src * scale`` for each pair of tensors."""
    sources, destinations = tensor_lists
    if all(src is dst for src, dst in zip(sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    elif scale == 1.0:  # megatron's main-to-model parameter copy: no scaled temporaries needed
        torch._foreach_copy_(destinations, sources)
    else:
        torch._foreach_copy_(destinations, torch._foreach_mul(sources, scale))


# (module, attribute, megatron's fallback, ours)
_HOOKS = (
    (clip_grads, "l2_norm_impl", mcore_utils.local_multi_tensor_l2_norm, _foreach_l2_norm),
    (clip_grads, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale, _foreach_scale),
    (mcore_optimizer, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale,
     _foreach_scale),
)


def _torch_optimizers(optimizer):
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if part.optimizer is not None:
            yield part.optimizer


@torch.no_grad()
def step_without_host_sync(optimizer, clip_grad: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """megatron's optimizer step after ``prepare_grads``, decided on the device.

    The norm is megatron's ``get_grad_norm`` (same gradients, same reduction groups) without its
    ``.item()``. Clipping (``clip_grad > 0``) divides the gradients by ``max(1, norm / clip_grad)``
    inside the AdamW kernel, which saves megatron's separate pass over them; a non-finite norm makes
    the kernel leave parameters, moments and step counts as they were. Needs the fused AdamW of
    ``use_fast_optimizer_kernels``.

    Returns the gradient norm and whether the step was skipped, both 0-dim tensors on the device.
    """
    squares = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        grads = part.get_main_grads_for_grad_norm()
        square = (torch.stack(torch._foreach_norm(grads)).square().sum() if grads
                  else torch.zeros((), device=device_type()))
        # Every rank joins the reduction, with or without gradients of its own.
        dist.all_reduce(square, group=part.get_grad_stats_parallel_group())
        squares.append(square)
    grad_norm = torch.stack(squares).sum().sqrt()
    skipped = ~torch.isfinite(grad_norm)
    grad_scale = (grad_norm + 1.0e-6).div(clip_grad).clamp(min=1.0) if clip_grad > 0 else None
    for inner in _torch_optimizers(optimizer):
        if not (isinstance(inner, torch.optim.Adam) and inner.defaults["fused"]):
            raise RuntimeError("step_without_host_sync needs torch's fused AdamW; call "
                               "use_fast_optimizer_kernels(optimizer) first.")
        inner.grad_scale, inner.found_inf = grad_scale, skipped.float()
    optimizer.step_with_ready_grads()
    return grad_norm, skipped


def use_fast_optimizer_kernels(optimizer, enabled: bool = True) -> None:
    """Fused AdamW and foreach grad-norm/clip kernels for ``optimizer`` (megatron's), or, with
    ``enabled=False``, megatron-core's own fallbacks. Idempotent; call it again after loading
    optimizer state, which may bring Adam's step counters back on the CPU."""
    for module, name, fallback, ours in _HOOKS:
        if getattr(module, name) in (fallback, ours):  # leave apex's or TE's kernels alone
            setattr(module, name, ours if enabled else fallback)
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
