"""Saves and resumes training exactly: model, optimizer, LR schedule, RNG and the trainer's state.

Layout (Megatron-LM's)::

    save_dir/latest_checkpointed_iteration.txt   the iteration to resume from, e.g. "100"
    save_dir/iter_0000100/                       a megatron-core distributed checkpoint

Each ``iter_*`` directory is written by ``megatron.core.dist_checkpointing`` from the sharded state
dicts of the model chunks and the optimizer, so it loads at another TP/PP/DP layout. Next to them it
holds, as common (rank-0) state, the trainer's ``train_state``, the scheduler, the run's config and
the layout it was saved at, and per rank a ``ShardedObject`` with every RNG stream keyed by the
rank's (pp, tp, dp) position, restored only at the same layout.

Crash safety: a save goes into ``iter_0000100.tmp-XXXX``, is fsynced, renamed into place, and only
then does the pointer move (temp file, fsync, ``os.replace``). A process killed at any point leaves
the previous checkpoint and pointer intact; leftover temp directories are never read and are
removed by the next save. A save that runs out of disk space removes its partial files and says
how many bytes it needed.

Integrity: every file's SHA-256 is recorded in the checkpoint (``checkpoint_checksums``) and
checked before anything is loaded from it; a damaged checkpoint is refused, naming the file, or,
with ``fall_back``, the newest intact earlier one is loaded instead.

Optimizer state: the non-distributed optimizer's state is sharded like the parameters. The
distributed optimizer is saved as ``fully_reshardable``, gathered into parameter-shaped tensors, so
both reshard over TP, PP and DP. (megatron-core's default, ``fully_sharded_model_space``, fails to
save: "ShardedTensor.flattened_range is not supported"; ``dp_reshardable`` reshards over DP only.)
The gather goes over gloo to DP rank 0 (``distrib_optim_fully_reshardable_mem_efficient``): the
other mode all-gathers the whole optimizer state into host memory on every rank (40 GB per rank
for a 3B model) and, on CPU, fails on its ``.cuda()`` calls. It needs the optimizer's gloo DP group
(``get_megatron_optimizer(..., use_gloo_process_groups=True)``, the default).

megatron-core 0.16.1 cannot load the distributed optimizer with torch's Adam (no TE/apex); the
workarounds live in ``_allocate_distributed_optimizer_state`` (no state before the first step) and
``_load_distributed_optimizer`` (KeyError on ``step``). After any load, every parameter gets its
own Adam ``step`` tensor back (``_give_each_param_its_own_step``): megatron-core hands all of them
one shared tensor, which torch's Adam increments once per parameter per step, so bias correction
is wrong from the first step after a resume.
"""

import contextlib
import errno
import logging
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from torch.distributed.checkpoint import CheckpointException as TorchCheckpointException

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_lpa.platform.parent_watch import exit_with_parent
from megatron_lpa.training.checkpoint_checksums import (
    MANIFEST,
    checksums,
    find_damage,
    write_manifest,
)

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
# 2 added checksums.json; version 1 checkpoints (without it) load unverified, with a warning.
FORMAT_VERSION = 2
SHARDING_TYPE = "fully_reshardable"
_SHARDING_METADATA = {
    "distrib_optim_sharding_type": SHARDING_TYPE,
    "distrib_optim_fully_reshardable_mem_efficient": True,
}
_NO_LOAD_OPTIM = "load with load_optim=False (--no-load-optim) to start a fresh optimizer"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the path and the fix."""


def checkpoint_dir(root: str, iteration: int) -> Path:
    """The directory of ``iteration``'s checkpoint under ``root``."""
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(load_dir: str) -> Optional[int]:
    """The iteration the pointer file in ``load_dir`` names; None when there is no pointer.

    Raises:
        CheckpointError: the pointer is unreadable or names an iteration that is not on disk.
    """
    pointer = Path(load_dir) / TRACKER_FILENAME
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(
            f"{pointer} holds {text!r}, not an iteration number; {_fallback(load_dir)}"
        ) from None
    if not checkpoint_dir(load_dir, iteration).is_dir():
        raise CheckpointError(
            f"{pointer} names iteration {iteration}, but {checkpoint_dir(load_dir, iteration)} "
            f"does not exist; {_fallback(load_dir)}"
        )
    return iteration


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
    temp = _on_rank0(lambda: _start_save(root, final, iteration))
    if temp is None:
        return None
    common = {
        "checkpoint_version": FORMAT_VERSION,
        "iteration": iteration,
        "layout": _layout(),
        "optimizer_format": _optimizer_format(optimizer),
        "train_state": train_state,
        "config": config_dict,
    }
    state = _sharded_state(model, optimizer, scheduler, with_rng=True, is_loading=False)
    written = UnpublishedCheckpoint(root, Path(temp), iteration, _bytes_to_write(state))
    _shield_writer_queue()
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
        raise CheckpointError(f"{load_dir} holds no checkpoint ({TRACKER_FILENAME} is missing); "
                              "give the --save directory of a run that saved one.")
    config = _read_common(load_dir, iteration).get("config")
    if not config:
        raise CheckpointError(f"{checkpoint_dir(load_dir, iteration)} was saved without its run "
                              "config; pass the model flags it was trained with.")
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
            _on_rank0(lambda: _publish(self.root, self.temp, final, self.iteration, self.manifest))

    def discard(self) -> None:
        """Deletes it; the pointer keeps naming the checkpoint before (collective)."""
        _on_rank0(lambda: shutil.rmtree(self.temp))

    @contextlib.contextmanager
    def reporting_disk_full(self) -> Iterator[None]:
        try:
            yield
        except (Exception, TorchCheckpointException) as err:  # the latter is a BaseException
            if _out_of_space(err, self):
                raise CheckpointError(_disk_full_message(self)) from err
            raise


def _writer_queue_manager_start(trainer_pid: int) -> None:
    """Runs first in the writer queue's manager process (see ``_shield_writer_queue``)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(trainer_pid)


def _shield_writer_queue() -> None:
    """Serves megatron-core's checkpoint-writer result queue from a process that ignores SIGTERM
    and ends with this one.

    megatron-core starts that queue's Manager process at the first save and reuses it. torchrun
    forwards SIGTERM to each worker's whole process group, so the Manager would die with the
    signal that asks for a final save, and that save would fail with BrokenPipeError. Ignoring
    SIGTERM, it would outlive a trainer killed with SIGKILL, so it watches the trainer.
    """
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(_writer_queue_manager_start, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


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
        _check_optimizer_format(common.get("optimizer_format"), _optimizer_format(optimizer), path)
        _allocate_distributed_optimizer_state(optimizer)
    same_layout = common["layout"] == _layout()
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
            f"that config. If its files are damaged: {_fallback(load_dir, iteration)} Cause: {err}"
        ) from err
    for chunk, key in zip(model, _model_keys(model)):
        _unwrap(chunk).load_state_dict(state[key], strict=True)
    if load_optim:
        _load_optimizer(optimizer, state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # main (fp32) params take the loaded weights
    if same_layout:
        _set_rng_state(state["rng_state"])
    else:
        _warn_on_rank0(f"checkpoint {path} was saved at layout {common['layout']}, this run is "
                       f"{_layout()}: RNG states not restored.")
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
            f"newest intact earlier checkpoint instead, or {_fallback(load_dir, iteration)}"
        )
    for earlier in sorted((i for i in _saved_iterations(load_dir) if i < iteration), reverse=True):
        earlier_damage = find_damage(checkpoint_dir(load_dir, earlier))
        if not earlier_damage:
            _warn_on_rank0(f"{report}. Falling back to iteration {earlier}; {load_dir}'s "
                           f"{TRACKER_FILENAME} now names it.")
            _on_rank0(lambda: _write_pointer(Path(load_dir), earlier))
            return earlier
        report += f". {checkpoint_dir(load_dir, earlier)} is damaged too: " + (
            "; ".join(earlier_damage) if earlier_damage is not None else f"it has no {MANIFEST}")
    raise CheckpointError(f"{report}. No intact earlier checkpoint is left in {load_dir}; "
                          "delete the pointer (or drop --load) to start over.")


def _warn_on_rank0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning(message)


# ---------------------------------------------------------------------------------------------
# Sharded state
# ---------------------------------------------------------------------------------------------


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    # Keys of DDP's own sharded_state_dict carry a "module." prefix; the model's do not.
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _model_keys(model: list) -> list:
    # Megatron-LM's keys: "model" for one chunk, "model0", "model1", ... for virtual pipelining.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _sharded_state(model, optimizer, scheduler, with_rng: bool, is_loading: bool) -> dict:
    state = {
        key: _unwrap(chunk).sharded_state_dict() for chunk, key in zip(model, _model_keys(model))
    }
    if optimizer is not None:
        # The optimizer maps its state onto the model's sharded tensors (all chunks at once).
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=_SHARDING_METADATA
        )
        _drop_empty_param_states(optimizer, state["optimizer"])
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        shape, offset = zip(*_layout_positions())
        state["rng_state"] = ShardedObject("rng_state", _get_rng_state(), shape, offset)
    return state


def _layout_positions() -> list:
    """(size, rank) of this rank in pipeline, tensor and data (with context) parallelism."""
    ps = parallel_state
    return [
        (ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()),
        (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
        (
            ps.get_data_parallel_world_size(with_context_parallel=True),
            ps.get_data_parallel_rank(with_context_parallel=True),
        ),
    ]


def _layout() -> dict:
    sizes = [size for size, _ in _layout_positions()]
    return dict(zip(("pipeline_parallel", "tensor_parallel", "data_parallel"), sizes))


def _read_common(load_dir: str, iteration: int) -> dict:
    path = checkpoint_dir(load_dir, iteration)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({err}); {_fallback(load_dir, iteration)}"
        ) from err
    if common.get("checkpoint_version") not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"{path} was not written by megatron_lpa's save_checkpoint (format version "
            f"{common.get('checkpoint_version')}, expected 1 or {FORMAT_VERSION}); convert it first."
        )
    if not (path / MANIFEST).is_file():
        if common["checkpoint_version"] == FORMAT_VERSION:
            raise CheckpointError(
                f"{path / MANIFEST} is missing, so the checkpoint's files cannot be checked; "
                f"{_fallback(load_dir, iteration)}"
            )
        _warn_on_rank0(f"{path} has no {MANIFEST} (saved before checksums were recorded); "
                       "loading it unverified.")
    return common


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------


def _get_rng_state() -> dict:
    tracker_states = tensor_parallel.get_cuda_rng_tracker().get_states()
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        # Cloned: the tracker replaces, not updates, its tensors, but these are pickled later.
        # Graph-safe trackers (--cuda-graph) hold generators: their state is saved instead.
        "tracker": {name: s.get_state() if isinstance(s, torch.Generator) else s.clone()
                    for name, s in tracker_states.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    current = tracker.get_states()
    if all(isinstance(current.get(name), torch.Generator) for name in state["tracker"]):
        for name, saved in state["tracker"].items():
            current[name].set_state(saved)
    else:
        tracker.set_states(state["tracker"])


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_format(optimizer) -> Optional[str]:
    if optimizer is None:
        return None
    distributed = any(isinstance(o, DistributedOptimizer) for o in _sub_optimizers(optimizer))
    return f"distributed:{SHARDING_TYPE}" if distributed else "local"


def _check_optimizer_format(saved: Optional[str], current: str, path: Path) -> None:
    if saved is None:
        raise CheckpointError(f"{path} holds no optimizer state; {_NO_LOAD_OPTIM}.")
    if saved != current:
        raise CheckpointError(
            f"{path} holds {saved!r} optimizer state but this run's optimizer is {current!r} "
            f"(--use-distributed-optimizer changed); {_NO_LOAD_OPTIM}, or keep the saved setting."
        )


def _sub_states(optimizer, state) -> list:
    # A chain of one has its member's state; longer chains key their members' states by position.
    return [state] if len(_sub_optimizers(optimizer)) == 1 else [state[i] for i in sorted(state)]


def _drop_empty_param_states(optimizer, state) -> None:
    """Removes the ``param_state: None`` of DP ranks > 0 of a distributed optimizer.

    Its state is gathered to DP rank 0 for saving; the None left on the other ranks makes
    dist_checkpointing warn on every save that their common state differs from rank 0's.
    """
    for sub_state in _sub_states(optimizer, state):
        if "param_state" in sub_state and sub_state["param_state"] is None:
            del sub_state["param_state"]


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Gives a fresh distributed optimizer's torch Adam the state megatron-core expects to exist.

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` reads the per-parameter ``step``
    of torch's Adam (asserting there is exactly one value), which does not exist before the first
    step. The values are placeholders; the load overwrites them.
    """
    for sub in _sub_optimizers(optimizer):
        if not isinstance(sub, DistributedOptimizer) or not isinstance(
            sub.optimizer, torch.optim.Adam
        ):
            continue
        for group in sub.optimizer.param_groups:
            for param in group["params"]:
                if not sub.optimizer.state[param]:
                    sub.optimizer.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }


def _load_optimizer(optimizer, state) -> None:
    for sub, sub_state in zip(_sub_optimizers(optimizer), _sub_states(optimizer, state)):
        if isinstance(sub, DistributedOptimizer):
            _load_distributed_optimizer(sub, sub_state)
        else:
            sub.load_state_dict(sub_state)
        _give_each_param_its_own_step(sub.optimizer)


def _load_distributed_optimizer(sub: DistributedOptimizer, state: dict) -> None:
    """``DistributedOptimizer.load_state_dict`` without its crash on torch Adam's ``step``.

    megatron-core copies every key of a parameter's torch state from the loaded parameter state,
    which never holds ``step`` (that comes from the param groups): KeyError. So load the groups and
    step first, then the parameter state with ``step`` set aside.
    """
    param_state = state.pop("param_state")
    sharding_type = state.pop("param_state_sharding_type")
    if sharding_type != SHARDING_TYPE:
        raise CheckpointError(
            f"distributed optimizer state saved as {sharding_type!r}; only {SHARDING_TYPE!r} is "
            f"supported: {_NO_LOAD_OPTIM}."
        )
    sub.load_state_dict(state)
    inner_state = sub.optimizer.state
    steps = {param: s.pop("step") for param, s in inner_state.items() if "step" in s}
    sub.load_parameter_state_from_fully_reshardable(param_state)
    for param, step in steps.items():
        inner_state[param]["step"] = step


def _give_each_param_its_own_step(torch_optimizer: torch.optim.Optimizer) -> None:
    """Gives every parameter a private Adam ``step`` tensor.

    megatron-core loads one step tensor into all parameters' state (torch keeps the object it is
    given); torch's Adam increments it in place once per parameter, so after a resume the step
    runs ahead by the number of parameters per iteration and bias correction is wrong.
    """
    for param_state in torch_optimizer.state.values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].clone()


# ---------------------------------------------------------------------------------------------
# Files: temp directory, publish, pointer
# ---------------------------------------------------------------------------------------------


def _on_rank0(fn: Callable):
    """Runs ``fn`` on global rank 0 and returns its result on every rank, or raises everywhere.

    Raising on rank 0 alone would leave the other ranks waiting in the next collective forever.
    """
    if not dist.is_initialized():
        return fn()
    result = [None, None]
    if dist.get_rank() == 0:
        try:
            result[0] = fn()
        except Exception as err:
            result[1] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise CheckpointError(f"saving a checkpoint failed on rank 0: {result[1]}")
    return result[0]


def _start_save(root: Path, final: Path, iteration: int) -> Optional[str]:
    """Makes a fresh temp directory for the save; None when ``iteration`` is already published."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("iter_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.is_dir() and latest_iteration(str(root)) == iteration:
        # Replacing the checkpoint the pointer names would leave no valid checkpoint for an
        # instant; it holds this same iteration, so keep it.
        logger.warning("%s already holds iteration %d; not saving it again.", final, iteration)
        return None
    temp = root / f"{final.name}.tmp-{secrets.token_hex(4)}"
    temp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the published checkpoint
    return str(temp)


def _publish(root: Path, temp: Path, final: Path, iteration: int, manifest: dict) -> None:
    write_manifest(temp, manifest)
    _fsync_tree(temp)
    if final.exists():
        # Left by a run that crashed before moving the pointer to it, or damaged and fallen back
        # from: never loaded, safe to drop.
        shutil.rmtree(final)
    os.rename(temp, final)
    _fsync_dir(root)
    _write_pointer(root, iteration)


def _write_pointer(root: Path, iteration: int) -> None:
    pointer_temp = root / f"{TRACKER_FILENAME}.tmp"
    with open(pointer_temp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_temp, root / TRACKER_FILENAME)
    _fsync_dir(root)


def _fsync_tree(path: Path) -> None:
    # dist_checkpointing fsyncs its tensor files but not common.pt, metadata.json or the
    # directories; a rename is only durable after the data it points to.
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _saved_iterations(root: str) -> list:
    """The iterations of the published ``iter_*`` directories in ``root``."""
    iterations = []
    for path in Path(root).glob("iter_*"):
        suffix = path.name[len("iter_") :]
        if suffix.isdigit() and path.is_dir():
            iterations.append(int(suffix))
    return sorted(iterations)


def _fallback(root: str, damaged: Optional[int] = None) -> str:
    """What to do when the checkpoint the pointer names cannot be used: name another one."""
    pointer = Path(root) / TRACKER_FILENAME
    others = [iteration for iteration in _saved_iterations(root) if iteration != damaged]
    if not others:
        return f"no other checkpoint is in {root}: delete {pointer} (or drop --load) to start over."
    return f"write one of the other saved iterations {sorted(others)} into {pointer}."


# ---------------------------------------------------------------------------------------------
# Disk full
# ---------------------------------------------------------------------------------------------


def _bytes_to_write(state: dict) -> int:
    """Bytes of tensor data all ranks together write for ``state`` (each shard once)."""
    local = sum(value.data.numel() * value.data.element_size() for value in nested_values(state)
                if isinstance(value, (ShardedTensor, ShardedTensorFactory))
                and is_main_replica(value.replica_id))
    total = torch.tensor([local], dtype=torch.int64,
                         device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(total)
    return int(total.item())


def _out_of_space(err: BaseException, written: UnpublishedCheckpoint) -> bool:
    """Whether ``err`` comes from the disk filling up: an ENOSPC or EDQUOT in it, or less room
    left than the rest of the checkpoint needs (torch's writer processes report some short
    writes without the errno, only their text comes back, and it may hold no errno at all)."""
    text = "".join(traceback.format_exception(err))
    if any(f"[Errno {code}]" in text for code in (errno.ENOSPC, errno.EDQUOT)):
        return True
    on_disk = sum(path.stat().st_size for path in written.temp.rglob("*") if path.is_file())
    return shutil.disk_usage(written.root).free < written.bytes_needed - on_disk


def _disk_full_message(written: UnpublishedCheckpoint) -> str:
    if dist.get_rank() == 0:
        shutil.rmtree(written.temp, ignore_errors=True)
    free = shutil.disk_usage(written.root).free
    latest = latest_iteration(str(written.root))
    kept = (f"the latest checkpoint is still iteration {latest} "
            f"({checkpoint_dir(written.root, latest)})" if latest is not None
            else "no earlier checkpoint had been saved")
    needed = written.bytes_needed
    return (
        f"no space left on the device (ENOSPC) saving iteration {written.iteration} to "
        f"{written.temp}: the checkpoint needs about {needed:,} bytes ({needed / 2**30:.2f} GiB) "
        f"and {written.root}'s filesystem has {free:,} bytes free with the partial files "
        f"removed; {kept}. Free space there or point --save at a larger filesystem."
    )
