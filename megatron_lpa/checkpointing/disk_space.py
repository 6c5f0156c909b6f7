"""A save that fills the disk: how many bytes it needs, and a message that says so."""

import errno
import shutil
import traceback

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)

from megatron_lpa.checkpointing.files import checkpoint_dir, latest_iteration

# ``written`` below is checkpoint.UnpublishedCheckpoint (root, temp, iteration, bytes_needed).


def bytes_to_write(state: dict) -> int:
    """Bytes of tensor data all ranks together write for ``state`` (each shard once)."""
    local = sum(
        value.data.numel() * value.data.element_size()
        for value in nested_values(state)
        if isinstance(value, (ShardedTensor, ShardedTensorFactory))
        and is_main_replica(value.replica_id)
    )
    total = torch.tensor(
        [local], dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    dist.all_reduce(total)
    return int(total.item())


def out_of_space(err: BaseException, written) -> bool:
    """Whether ``err`` comes from the disk filling up: an ENOSPC or EDQUOT in it, or less room
    left than the rest of the checkpoint needs (torch's writer processes report some short
    writes without the errno, only their text comes back, and it may hold no errno at all)."""
    text = "".join(traceback.format_exception(err))
    if any(f"[Errno {code}]" in text for code in (errno.ENOSPC, errno.EDQUOT)):
        return True
    on_disk = sum(path.stat().st_size for path in written.temp.rglob("*") if path.is_file())
    return shutil.disk_usage(written.root).free < written.bytes_needed - on_disk


def disk_full_message(written) -> str:
    if dist.get_rank() == 0:
        shutil.rmtree(written.temp, ignore_errors=True)
    free = shutil.disk_usage(written.root).free
    latest = latest_iteration(str(written.root))
    kept = (
        f"the latest checkpoint is still iteration {latest} "
        f"({checkpoint_dir(written.root, latest)})"
        if latest is not None
        else "no earlier checkpoint had been saved"
    )
    needed = written.bytes_needed
    return (
        f"no space left on the device (ENOSPC) saving iteration {written.iteration} to "
        f"{written.temp}: the checkpoint needs about {needed:,} bytes ({needed / 2**30:.2f} GiB) "
        f"and {written.root}'s filesystem has {free:,} bytes free with the partial files "
        f"removed; {kept}. Free space there or point --save at a larger filesystem."
    )
