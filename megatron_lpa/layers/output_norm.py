"""A sublayer's output projection followed by a norm: the paper's GPT-style (setting 1) block.

The paper's GPT-style layer normalises each sublayer's *output* inside its residual branch,
``x = x + Dropout(Norm(Attn(x)))`` then ``x = x + Dropout(Norm(FFN(x)))``, with no norm on the
branch inputs and none after the last layer. megatron's ``TransformerLayer`` already gives the rest
of that shape through its spec: identity input norms, and its bias-dropout-add applies the dropout
and the residual to whatever the output slot returns. So this module fills the output slot
(``linear_proj`` / ``linear_fc2``) with the slot's linear and a norm over its biased output.
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


@dataclass
class NormalizedOutputSubmodules:
    linear: Union[ModuleSpec, type]
    """The slot's own linear (megatron's ``RowParallelLinear`` or ``LowRankRowParallelLinear``)."""
    norm: Union[ModuleSpec, type]
    """The norm, built as megatron's norm slots are: ``(config, hidden_size, eps)``."""


class NormalizedOutputLinear(MegatronModule):
    """``y = Norm(W x + b)`` in a row-parallel slot.

    Takes megatron's row-parallel constructor arguments and passes them to ``linear``.
    ``forward(x)``: ``x`` is ``[s, b, in/t]``; returns ``([s, b, out], None)`` (``[s/t, b, out]``
    with sequence parallelism, where the norm runs on the local shard and its weights are marked
    ``sequence_parallel`` by the norm builder). The bias is added before the norm, so none is
    returned. Parameters: ``linear.*`` (the linear's, sharded as it shards them), ``norm.*``
    (replicated).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        submodules: NormalizedOutputSubmodules,
        **linear_kwargs,
    ):
        super().__init__(config=config)
        self.linear = build_module(
            submodules.linear, input_size, output_size, config=config, **linear_kwargs
        )
        self.norm = build_module(
            submodules.norm, config=config, hidden_size=output_size, eps=config.layernorm_epsilon
        )

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        output, bias = self.linear(input_)
        if bias is not None:
            output = output + bias
        return self.norm(output), None

    def backward_dw(self) -> None:
        self.linear.backward_dw()
