"""Fast kernels for megatron-core's optimizer step when neither Transformer Engine nor apex is there.

Without them megatron-core steps torch's ``AdamW`` in its default (foreach) mode, about ten passes
over the fp32 master weights and moments, and its fallback grad norm (``local_multi_tensor_l2_norm``)
takes one norm per tensor and copies each to the host. ``use_fast_optimizer_kernels`` switches the
AdamW to torch's fused kernel (one pass) and fills megatron's multi-tensor hooks, which it otherwise
takes from apex or TE, with torch's foreach kernels (no host round trip until megatron's one
``.item()``). It changes no arithmetic beyond rounding order.
"""

import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mcore_optimizer


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
            continue
        for param, state in inner.state.items():
            step = state.get("step")
            if torch.is_tensor(step) and step.device != param.device:
                # The fused kernel reads the step count on the parameter's device.
                state["step"] = step.to(param.device, torch.float32)
