"""Builds the GPT model (any variant, any pipeline stage) from one ``LPAConfig``."""

from megatron_lpa.models.gpt_model import LPAGPTModel
from megatron_lpa.models.layer_spec import get_lpa_block_spec
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.models.pytorch_init import init_like_pytorch


def build_model(
    config: LPAConfig,
    pre_process: bool = True,
    post_process: bool = True,
) -> LPAGPTModel:
    """megatron-core ``GPTModel`` (with the fused loss, ``LPAGPTModel``) and the LPA layer spec.

    ``pre_process``/``post_process`` say whether this pipeline stage holds the embedding / the
    output head (megatron's model-provider contract). The model's logits are vocab-parallel over TP.
    With ``config.init_style == "pytorch"`` every tensor is then re-initialised as PyTorch's modules
    would (``pytorch_init``).
    """
    model = LPAGPTModel(
        config=config,
        transformer_layer_spec=get_lpa_block_spec(config),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_base=config.rotary_base,
    )
    if config.init_style == "pytorch" and config.perform_initialization:
        init_like_pytorch(model, config.init_seed)
    return model
