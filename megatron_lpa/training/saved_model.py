"""A trained model back from its checkpoint: the run's config, tokenizer and weights, at any layout.

The checkpoint stores the run's resolved config; this rebuilds the model from it (this run's
TP/PP sizes, megatron-core resharding the weights) for evaluation, generation and export.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_lpa.checkpointing.checkpoint import load_checkpoint, saved_config
from megatron_lpa.config.model_config import lpa_config, padded_vocab_size
from megatron_lpa.config.training_config import TrainingConfig
from megatron_lpa.models.builder import build_model
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.platform.distributed import device_type, initialize_distributed, set_seed
from megatron_lpa.tokenizers import build_tokenizer


@dataclass
class SavedModel:
    model: torch.nn.Module
    """This pipeline stage's ``LPAGPTModel``, in eval mode, on the device."""
    cfg: TrainingConfig
    """The run's config with this process's layout and batch."""
    config: LPAConfig
    tokenizer: Optional[object]
    iteration: int


def load_saved_model(
    load_dir: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    micro_batch_size: int = 1,
    tokenizer_model: Optional[str] = None,
) -> SavedModel:
    """Joins the process group, builds the saved run's model for this layout and loads it.

    Args:
        load_dir: a ``--save`` directory; its latest checkpoint is loaded.
        tensor_model_parallel_size, pipeline_model_parallel_size: this run's layout (the world
            size must be a multiple of their product; the rest is data parallel).
        micro_batch_size: samples per data-parallel rank per step.
        tokenizer_model: the tokenizer file, where it moved since training.
    """
    saved_cfg = TrainingConfig.from_dict(saved_config(load_dir))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // (tensor_model_parallel_size * pipeline_model_parallel_size)
    cfg = saved_cfg.replace(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        micro_batch_size=micro_batch_size,
        global_batch_size=micro_batch_size * max(dp, 1),
        sequence_parallel=saved_cfg.parallel.sequence_parallel and tensor_model_parallel_size > 1,
        tokenizer_model=tokenizer_model or saved_cfg.data.tokenizer_model,
        load=load_dir,
        save=None,
        save_interval=None,
        cuda_graph=False,
        train_samples=None,
        train_iters=saved_cfg.schedule.train_iters or 1,
    ).validate(world)
    initialize_distributed(tensor_model_parallel_size, pipeline_model_parallel_size)
    set_seed(cfg.run.seed)
    tokenizer, vocab = None, cfg.data.vocab_size
    if cfg.data.tokenizer_type:
        tokenizer = build_tokenizer(
            cfg.data.tokenizer_type,
            cfg.data.tokenizer_model,
            cfg.data.vocab_file,
            cfg.data.merge_file,
            cfg.data.vocab_size,
        )
        vocab = tokenizer.vocab_size
    # The rows the checkpoint holds: padded for the TP size it was trained at, not this one.
    rows = padded_vocab_size(vocab, saved_cfg)
    if rows % tensor_model_parallel_size:
        raise ValueError(
            f"{load_dir} holds {rows} vocabulary rows, which do not split over "
            f"TP={tensor_model_parallel_size}; use a TP size that divides {rows}."
        )
    config = dataclasses.replace(lpa_config(cfg, rows), perform_initialization=False)
    model = build_model(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if device_type() == "cuda":
        model.cuda(torch.cuda.current_device())
    state = load_checkpoint(load_dir, [model], None, None)
    return SavedModel(model.eval(), cfg, config, tokenizer, state["iteration"])
