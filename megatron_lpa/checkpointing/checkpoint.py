"""Saves and loads a training checkpoint; a collective call on every rank.

Each ``iter_*`` directory is written by ``megatron.core.dist_checkpointing`` from the sharded state
dicts of the model and the optimizer, so it loads at another TP/PP/DP layout. Next to them it
holds, as common (rank-0) state, the trainer's ``train_state``, the scheduler, the run's config and
the layout it was saved at, and per rank a ``ShardedObject`` with every RNG stream keyed by the
rank's (pp, tp, dp) position, restored only at the same layout.

Integrity: every file's SHA-256 is recorded in the checkpoint (``checksums``) and checked before
anything is loaded from it; a damaged checkpoint is refused, naming the file, or, with
``fall_back``, the newest intact earlier one is loaded instead. A save that runs out of disk space
removes its partial files and says how many bytes it needed (``disk_space``).
"""

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel
from torch.distributed.checkpoint import CheckpointException as TorchCheckpointException

from megatron_lpa.checkpointing.checksums import MANIFEST, checksums, find_damage
from megatron_lpa.checkpointing.disk_space import bytes_to_write, disk_full_message, out_of_space
from megatron_lpa.checkpointing.files import (
    TRACKER_FILENAME,
    CheckpointError,
    checkpoint_dir,
    fallback_hint,
    latest_iteration,
    on_rank0,
    publish,
    saved_iterations,
    start_save,
    warn_on_rank0,
    write_pointer,
)
from megatron_lpa.checkpointing.layout import layout, layout_positions
from megatron_lpa.checkpointing.optimizer_state import (
    SHARDING_METADATA,
    allocate_distributed_optimizer_state,
    check_optimizer_format,
    drop_empty_param_states,
    load_optimizer,
    optimizer_format,
)
from megatron_lpa.checkpointing.rng_state import get_rng_state, set_rng_state
from megatron_lpa.platform import megatron_patches

# 2 added checksums.json; version 1 checkpoints (without it) load unverified, with a warning.
FORMAT_VERSION = 2
# Megatron-LM's key of a model without virtual pipeline stages.
MODEL_KEY = "model"


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model: list,
    optimizer,
    scheduler,
    train_state: dict,
    config_dict: Optional[dict] = None,
    publish: bool = True,
) -> Optional["UnpublishedCheckpoint"]:
    """Saves everything needed to resume at ``iteration``; a collective call on every rank.

    Args:
        save_dir: root directory; ``iter_XXXXXXX`` and the pointer file go into it.
        iteration: the number of the last completed training step.
        model: megatron's model chunks (``DistributedDataParallel``-wrapped or bare).
        optimizer: what ``get_megatron_optimizer`` returned, or None to save the model only.
        scheduler: the ``OptimizerParamScheduler``, or None.
        train_state: small picklable dict owned by the trainer (consumed samples, data position,
            ...); identical on every rank. ``load_checkpoint`` returns it.
        config_dict: the run's resolved config, stored for reference.
        publish: False writes the checkpoint completely but leaves it in its temp directory,
            where no load sees it, until ``publish()`` is called on the returned object.

    Returns:
        With ``publish=False``, the written checkpoint; else None (also when ``iteration`` was
        already published).

    Raises:
        CheckpointError: the disk filled up (the message names the path and the bytes needed).
    """
    root = Path(save_dir)
    final = checkpoint_dir(save_dir, iteration)
    temp = on_rank0(lambda: start_save(root, final, iteration))
    if temp is None:
        return None
    common = {
        "checkpoint_version": FORMAT_VERSION,
        "iteration": iteration,
        "layout": layout(),
        "optimizer_format": optimizer_format(optimizer),
        "train_state": train_state,
        "config": config_dict,
    }
    state = _sharded_state(model, optimizer, scheduler, with_rng=True, is_loading=False)
    written = UnpublishedCheckpoint(root, Path(temp), iteration, bytes_to_write(state))
    megatron_patches.shield_checkpoint_writer_queue()
    megatron_patches.writer_workers_exit_with_parent()
    with written.reporting_disk_full():
        dist_checkpointing.save({**state, **common}, temp)
        dist.barrier()  # every rank's files are complete before they are hashed and published
        written.manifest = checksums(written.temp)
    if not publish:
        return written
    written.publish()
    return None


def saved_config(load_dir: str) -> dict:
    """The run config (``TrainingConfig.to_dict()``) saved with ``load_dir``'s latest checkpoint."""
    iteration = latest_iteration(load_dir)
    if iteration is None:
        raise CheckpointError(
            f"{load_dir} holds no checkpoint ({TRACKER_FILENAME} is missing); "
            "give the --save directory of a run that saved one."
        )
    config = _read_common(load_dir, iteration).get("config")
    if not config:
        raise CheckpointError(
            f"{checkpoint_dir(load_dir, iteration)} was saved without its run "
            "config; pass the model flags it was trained with."
        )
    return config


@dataclass
class UnpublishedCheckpoint:
    """A checkpoint written into its temp directory, not yet where ``load_checkpoint`` looks."""

    root: Path
    temp: Path
    iteration: int
    bytes_needed: int
    manifest: Optional[dict] = None

    def publish(self) -> None:
        """Moves it into place and points the pointer at it (collective)."""
        final = checkpoint_dir(self.root, self.iteration)
        with self.reporting_disk_full():
            on_rank0(lambda: publish(self.root, self.temp, final, self.iteration, self.manifest))

    def discard(self) -> None:
        """Deletes it; the pointer keeps naming the checkpoint before (collective)."""
        on_rank0(lambda: shutil.rmtree(self.temp))

    @contextlib.contextmanager
    def reporting_disk_full(self) -> Iterator[None]:
        try:
            yield
        except (Exception, TorchCheckpointException) as err:  # the latter is a BaseException
            if out_of_space(err, self):
                raise CheckpointError(disk_full_message(self)) from err
            raise


def load_checkpoint(
    load_dir: str,
    model: list,
    optimizer,
    scheduler,
    load_optim: bool = True,
    fall_back: bool = False,
) -> Optional[dict]:
    """Loads the checkpoint the pointer in ``load_dir`` names; a collective call on every rank.

    Its files are checked against the checksums recorded at save before anything is read. The
    model reshards to this run's TP/PP/DP layout; so does the optimizer, unless it changed between
    distributed and non-distributed. RNG streams are restored only at the saved layout.

    Args:
        load_dir: a directory written by ``save_checkpoint``.
        model: megatron's model chunks, built for this run's layout.
        optimizer: the optimizer for ``model`` (None to load the model only).
        scheduler: the ``OptimizerParamScheduler`` (None to skip it).
        load_optim: False loads the model (and RNG) only and leaves optimizer and scheduler fresh.
        fall_back: when the checkpoint fails its checksums, load the newest earlier one that
            passes and point the pointer at it (the damaged one stays on disk, never loaded).

    Returns:
        The saved ``train_state``, or None when ``load_dir`` holds no checkpoint yet.

    Raises:
        CheckpointError: missing directory, bad pointer, damaged checkpoint, or optimizer state
            that cannot be loaded into this optimizer; the message says what to do.
    """
    if not Path(load_dir).is_dir():
        raise CheckpointError(
            f"checkpoint directory {load_dir} does not exist; fix the --load path, or leave "
            "--load out to train from scratch."
        )
    iteration = latest_iteration(load_dir)
    if iteration is None:
        return None
    iteration = _intact_iteration(load_dir, iteration, fall_back)
    path = checkpoint_dir(load_dir, iteration)
    common = _read_common(load_dir, iteration)
    load_optim = load_optim and optimizer is not None
    if load_optim:
        check_optimizer_format(common.get("optimizer_format"), optimizer_format(optimizer), path)
        allocate_distributed_optimizer_state(optimizer)
    same_layout = common["layout"] == layout()
    request = _sharded_state(
        model,
        optimizer if load_optim else None,
        scheduler if load_optim else None,
        with_rng=same_layout,
        is_loading=True,
    )
    try:
        state = dist_checkpointing.load(request, str(path))
    except (Exception, TorchCheckpointException) as err:  # the latter is a BaseException
        raise CheckpointError(
            f"could not load {path}. If it was saved for another model config, load it with "
            f"that config. If its files are damaged: {fallback_hint(load_dir, iteration)} "
            f"Cause: {err}"
        ) from err
    _one_chunk(model).load_state_dict(state[MODEL_KEY], strict=True)
    if load_optim:
        load_optimizer(optimizer, state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # main (fp32) params take the loaded weights
    if same_layout:
        set_rng_state(state["rng_state"])
    else:
        warn_on_rank0(
            f"checkpoint {path} was saved at layout {common['layout']}, this run is "
            f"{layout()}: RNG states not restored."
        )
    return state["train_state"]


def _intact_iteration(load_dir: str, iteration: int, fall_back: bool) -> int:
    """``iteration`` if its files match their checksums; else, with ``fall_back``, the newest
    earlier iteration that does (the pointer moves to it).

    Raises:
        CheckpointError: the checkpoint is damaged (and, with ``fall_back``, every earlier one).
    """
    path = checkpoint_dir(load_dir, iteration)
    damage = find_damage(path)
    if not damage:  # None: no checksums to check, which _read_common judges by the version
        return iteration
    report = f"{path} is damaged: " + "; ".join(damage)
    if not fall_back:
        raise CheckpointError(
            f"{report}. Nothing was loaded. Pass --fallback-to-previous-checkpoint to load the "
            f"newest intact earlier checkpoint instead, or {fallback_hint(load_dir, iteration)}"
        )
    for earlier in sorted((i for i in saved_iterations(load_dir) if i < iteration), reverse=True):
        earlier_damage = find_damage(checkpoint_dir(load_dir, earlier))
        if not earlier_damage:
            warn_on_rank0(
                f"{report}. Falling back to iteration {earlier}; {load_dir}'s "
                f"{TRACKER_FILENAME} now names it."
            )
            on_rank0(lambda: write_pointer(Path(load_dir), earlier))
            return earlier
        report += f". {checkpoint_dir(load_dir, earlier)} is damaged too: " + (
            "; ".join(earlier_damage) if earlier_damage is not None else f"it has no {MANIFEST}"
        )
    raise CheckpointError(
        f"{report}. No intact earlier checkpoint is left in {load_dir}; "
        "delete the pointer (or drop --load) to start over."
    )


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    # Keys of DDP's own sharded_state_dict carry a "module." prefix; the model's do not.
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _one_chunk(model: list) -> torch.nn.Module:
    if len(model) != 1:
        raise ValueError(
            f"a checkpoint holds one model chunk per pipeline stage, got {len(model)} "
            "(virtual pipeline stages are not supported)"
        )
    return _unwrap(model[0])


def _sharded_state(model, optimizer, scheduler, with_rng: bool, is_loading: bool) -> dict:
    state = {MODEL_KEY: _one_chunk(model).sharded_state_dict()}
    if optimizer is not None:
        # The optimizer maps its state onto the model's sharded tensors.
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=SHARDING_METADATA
        )
        drop_empty_param_states(optimizer, state["optimizer"])
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        shape, offset = zip(*layout_positions())
        state["rng_state"] = ShardedObject("rng_state", get_rng_state(), shape, offset)
    return state


def _read_common(load_dir: str, iteration: int) -> dict:
    path = checkpoint_dir(load_dir, iteration)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({err}); {fallback_hint(load_dir, iteration)}"
        ) from err
    if common.get("checkpoint_version") not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"{path} was not written by megatron_lpa's save_checkpoint (format version "
            f"{common.get('checkpoint_version')}, expected 1 or {FORMAT_VERSION}); convert it "
            "first."
        )
    if not (path / MANIFEST).is_file():
        if common["checkpoint_version"] == FORMAT_VERSION:
            raise CheckpointError(
                f"{path / MANIFEST} is missing, so the checkpoint's files cannot be checked; "
                f"{fallback_hint(load_dir, iteration)}"
            )
        warn_on_rank0(
            f"{path} has no {MANIFEST} (saved before checksums were recorded); "
            "loading it unverified."
        )
    return common
