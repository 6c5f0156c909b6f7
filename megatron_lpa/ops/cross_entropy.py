"""Fused vocabulary-parallel cross-entropy for megatron's GPT loss.

megatron-core's unfused loss casts the ``[s, b, v/t]`` logits to fp32 and makes several fp32 passes
(max, subtract, exp, sum, softmax kept for backward). Here ``csrc/cross_entropy.cu`` reads the
bf16 logits once forward and once backward; across tensor-parallel ranks only per-token
``(max, sum of exp, label logit)`` travel, as in megatron's own vocab-parallel loss.
"""

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lpa.ops._ext import kernels_for


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp_group):
        vocab = logits.shape[-1]
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        rows = logits.reshape(-1, vocab).contiguous()  # [s*b, v/t]
        row_labels = labels.reshape(-1).long().contiguous()  # [s*b]
        vocab_start = rank * vocab
        row_max, sum_exp, label_logit = kernels_for(rows).cross_entropy_stats(
            rows, row_labels, vocab_start
        )
        if tp_size > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack([sum_exp * torch.exp(row_max - global_max), label_logit])
            dist.all_reduce(sums, group=tp_group)
            row_max, sum_exp, label_logit = global_max, sums[0], sums[1]
        lse = row_max + torch.log(sum_exp)
        ctx.save_for_backward(rows, row_labels, lse)
        ctx.vocab_start, ctx.logits_shape = vocab_start, logits.shape
        return (lse - label_logit).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        rows, row_labels, lse = ctx.saved_tensors
        grad = grad_loss.reshape(-1).float().contiguous()
        grad_logits = kernels_for(rows).cross_entropy_backward(
            rows, row_labels, lse, grad, ctx.vocab_start
        )
        return grad_logits.view(ctx.logits_shape), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, tp_group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Per-token loss ``[s, b]`` (fp32) of ``logits [s, b, v/t]``, this rank's vocabulary slice
    (rank ``i`` holds columns ``[i*v/t, (i+1)*v/t)``), against global ``labels [s, b]``."""
    return _VocabParallelCrossEntropy.apply(logits, labels, tp_group)
