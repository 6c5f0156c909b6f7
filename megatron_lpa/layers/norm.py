"""RMSNorm / LayerNorm usable with sequence parallelism, for builds without Transformer Engine.

megatron-core's fallback norm (``WrappedTorchNorm``) refuses sequence parallelism. Under SP each
rank normalises its own ``[s/t, b, h]`` shard, so the weight (and bias) gradients differ per rank;
marking them ``sequence_parallel`` makes ``finalize_model_grads`` sum them over the TP group.
RMSNorm runs on the fused kernels of ``megatron_lpa.ops`` unless ``--no-fused-kernels``; LayerNorm
is torch's.
"""

import torch

from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.ops.rms_norm import FusedRMSNorm


class SequenceParallelNormFactory:
    """Makes an RMSNorm (``FusedRMSNorm`` with ``config.fused_kernels``, else torch's) or a
    ``torch.nn.LayerNorm`` from ``config.normalization``; the module made is that norm itself.

    A class only because megatron-core's ``build_module`` calls classes in spec slots and hands
    functions back uncalled; wrapping the norm in a module of ours would rename its parameters
    in checkpoints and exports. Same call as megatron's norm slots: ``(config, hidden_size,
    eps)``; input and output ``[s(/t), b, h]``.
    """

    def __new__(cls, config: LPAConfig, hidden_size: int, eps: float = 1e-5):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("--apply-layernorm-1p (zero-centred gamma) needs Transformer Engine.")
        norm_classes = {
            "RMSNorm": FusedRMSNorm if config.fused_kernels else torch.nn.RMSNorm,
            "LayerNorm": torch.nn.LayerNorm,
        }
        if config.normalization not in norm_classes:
            raise ValueError(
                f"normalization must be one of {sorted(norm_classes)}, got {config.normalization!r}"
            )
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        norm = norm_classes[config.normalization](
            hidden_size, eps=eps, device=device, dtype=config.params_dtype
        )
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
