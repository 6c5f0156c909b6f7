"""Resuming a run from ``--load``: the saved config checked against this run's, then the state."""

from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_lpa.checkpointing.checkpoint import load_checkpoint, saved_config
from megatron_lpa.checkpointing.files import latest_iteration
from megatron_lpa.config.training_config import (
    ConfigError,
    ModelSection,
    TrainingConfig,
    differences,
)


def resume(cfg: TrainingConfig, model: list, optimizer, scheduler) -> Optional[dict]:
    """Loads the latest checkpoint of ``--load`` into ``model``, ``optimizer`` and ``scheduler``.

    Returns its train state, or None when the directory holds no checkpoint yet (a first run,
    which starts from scratch). Raises ``ConfigError`` for a checkpoint of another model.
    """
    load_dir = cfg.checkpoint.load
    loaded = None
    if Path(load_dir).is_dir():
        if latest_iteration(load_dir) is not None:
            check_saved_config(load_dir, cfg)
        loaded = load_checkpoint(
            load_dir,
            model,
            optimizer,
            scheduler,
            load_optim=not cfg.checkpoint.no_load_optim,
            fall_back=cfg.checkpoint.fallback_to_previous_checkpoint,
        )
    if dist.get_rank() == 0:
        print(
            f"--load {load_dir}: no checkpoint yet, starting from scratch."
            if loaded is None
            else f"Resumed from {load_dir} at iteration {loaded['iteration']} "
            f"({loaded['consumed_train_samples']} samples consumed).",
            flush=True,
        )
    return loaded


def check_saved_config(load_dir: str, cfg: TrainingConfig) -> None:
    """Refuses a checkpoint of another model; says what else changed since it was saved.

    Another model is any model setting but those that only say how the weights start
    (``ModelSection.INIT_ONLY``: dropout, initialisation); those and the parallel layout may
    change, and rank 0 lists what did.
    """
    saved = TrainingConfig.from_dict(saved_config(load_dir))
    changed = differences(saved, cfg, "model")
    different_model = {k: v for k, v in changed.items() if k not in ModelSection.INIT_ONLY}
    if different_model:
        raise ConfigError(
            f"--load {load_dir} holds another model: "
            + "; ".join(
                f"--{name.replace('_', '-')} was {old!r}, this run has {new!r}"
                for name, (old, new) in different_model.items()
            )
            + ". Resume with the flags the checkpoint was trained with, or drop --load to "
            "train this model from scratch."
        )
    changed.update(differences(saved, cfg, "parallel"))
    if changed and dist.get_rank() == 0:
        print(
            f"--load {load_dir}: changed since the checkpoint was saved: "
            + "; ".join(
                f"--{name.replace('_', '-')} {old!r} -> {new!r}"
                for name, (old, new) in changed.items()
            )
            + ".",
            flush=True,
        )
