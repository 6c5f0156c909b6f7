"""megatron-core's ``GPTModel`` with the fused vocabulary-parallel cross-entropy as its loss."""

from torch import Tensor

from megatron.core.models.gpt import GPTModel

from megatron_lpa.ops.cross_entropy import vocab_parallel_cross_entropy


class LPAGPTModel(GPTModel):
    """``GPTModel`` whose language-model loss is ``megatron_lpa.ops.cross_entropy`` when
    ``config.fused_kernels`` is set (megatron's own loss otherwise); everything else is megatron's."""

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """Per-token loss ``[b, s]`` of ``logits [s, b, v/t]`` (vocab-parallel) and ``labels [b, s]``."""
        if not self.config.fused_kernels:
            return super().compute_language_model_loss(labels, logits)
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()
