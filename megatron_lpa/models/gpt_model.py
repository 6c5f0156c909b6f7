"""megatron-core's ``GPTModel`` with the fused vocabulary-parallel cross-entropy as its loss, an
optional output-layer bias and its own embedding dropout."""

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import Tensor

from megatron_lpa.ops.cross_entropy import vocab_parallel_cross_entropy


class LPAGPTModel(GPTModel):
    """``GPTModel`` whose language-model loss is ``megatron_lpa.ops.cross_entropy`` when
    ``config.fused_kernels`` is set (megatron's own loss otherwise).

    Beyond megatron's: ``config.output_layer_bias`` adds a bias ``[vocab/t]`` (split over TP like
    the output weight) to the output layer, and ``config.embedding_dropout`` sets the embedding's
    dropout apart from ``hidden_dropout``. Everything else is megatron's.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.pre_process and config.embedding_dropout is not None:
            self.embedding.embedding_dropout.p = config.embedding_dropout
        if self.post_process and config.output_layer_bias:
            self._add_output_layer_bias()

    def _add_output_layer_bias(self) -> None:
        """megatron's ``GPTModel`` builds its output ``ColumnParallelLinear`` without a bias and has
        no switch for one; the layer adds ``self.bias`` when it has one, so it gets one here, zero
        as
        megatron initialises biases and with the attributes megatron gives a column bias."""
        layer = self.output_layer
        device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
        bias = torch.nn.Parameter(
            torch.zeros(
                layer.output_size_per_partition, dtype=self.config.params_dtype, device=device
            )
        )
        set_tensor_model_parallel_attributes(bias, is_parallel=True, dim=0, stride=1)
        setattr(bias, "allreduce", True)
        layer.bias = bias

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """Per-token loss ``[b, s]`` of ``logits [s, b, v/t]`` (vocab-parallel) and ``labels [b,
        s]``."""
        if not self.config.fused_kernels:
            return super().compute_language_model_loss(labels, logits)
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()
