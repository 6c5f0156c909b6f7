"""The checkpoint directory, crash-safe: temp directories, the pointer file, publishing.

A save goes into ``iter_0000100.tmp-XXXX``, is fsynced, renamed into place, and only then does the
pointer move (temp file, fsync, ``os.replace``). A process killed at any point leaves the previous
checkpoint and pointer intact; leftover temp directories are never read and are removed by the
next save.
"""

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megatron_lpa.checkpointing.checksums import write_manifest

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"


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
            f"{pointer} holds {text!r}, not an iteration number; {fallback_hint(load_dir)}"
        ) from None
    if not checkpoint_dir(load_dir, iteration).is_dir():
        raise CheckpointError(
            f"{pointer} names iteration {iteration}, but {checkpoint_dir(load_dir, iteration)} "
            f"does not exist; {fallback_hint(load_dir)}"
        )
    return iteration


def saved_iterations(root: str) -> list:
    """The iterations of the published ``iter_*`` directories in ``root``."""
    iterations = []
    for path in Path(root).glob("iter_*"):
        suffix = path.name[len("iter_") :]
        if suffix.isdigit() and path.is_dir():
            iterations.append(int(suffix))
    return sorted(iterations)


def fallback_hint(root: str, damaged: Optional[int] = None) -> str:
    """What to do when the checkpoint the pointer names cannot be used: name another one."""
    pointer = Path(root) / TRACKER_FILENAME
    others = [iteration for iteration in saved_iterations(root) if iteration != damaged]
    if not others:
        return f"no other checkpoint is in {root}: delete {pointer} (or drop --load) to start over."
    return f"write one of the other saved iterations {sorted(others)} into {pointer}."


def on_rank0(fn: Callable):
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


def warn_on_rank0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning(message)


def start_save(root: Path, final: Path, iteration: int) -> Optional[str]:
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


def publish(root: Path, temp: Path, final: Path, iteration: int, manifest: dict) -> None:
    write_manifest(temp, manifest)
    fsync_tree(temp)
    if final.exists():
        # Left by a run that crashed before moving the pointer to it, or damaged and fallen back
        # from: never loaded, safe to drop.
        shutil.rmtree(final)
    os.rename(temp, final)
    fsync_dir(root)
    write_pointer(root, iteration)


def write_pointer(root: Path, iteration: int) -> None:
    pointer_temp = root / f"{TRACKER_FILENAME}.tmp"
    with open(pointer_temp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_temp, root / TRACKER_FILENAME)
    fsync_dir(root)


def fsync_tree(path: Path) -> None:
    # dist_checkpointing fsyncs its tensor files but not common.pt, metadata.json or the
    # directories; a rename is only durable after the data it points to.
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
