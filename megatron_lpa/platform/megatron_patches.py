"""Every change megatron_lpa makes to megatron-core 0.16.1's behaviour, in one place.

megatron-core takes some kernels only from Transformer Engine or apex, keeps some state in module
and class attributes, and assumes a process group in one dataset path. Each patch below says what
it changes, why, and what megatron-core 0.16.1 does without it; ``tests/platform/
test_megatron_patches.py`` checks each against the installed megatron-core, so an upgrade that
makes one unnecessary or breaks it fails there first. ``apply()`` installs the start-up patches
once (``initialize_distributed`` calls it); the others are called where their moment comes.
Running on CPU bends megatron-core further; that lives in ``cpu_support`` alone and is never
active on a GPU.

==================================  ===========================================================
patch                               megatron-core 0.16.1 without it
==================================  ===========================================================
``fused_rope`` (apply)              ``rope_utils.fused_apply_rotary_pos_emb`` is None without TE,
                                    so ``apply_rope_fusion`` cannot be set
``wgrad_accumulation`` (apply)      ``layers._grad_accum_fusion_available`` is False without apex,
                                    so ``gradient_accumulation_fusion`` cannot be set
``use_multi_tensor_kernels``        ``clip_grads``/``optimizer`` use ``local_multi_tensor_*``:
                                    one norm per tensor, each copied to the host
``shield_checkpoint_writer_queue``  the checkpoint writer's result-queue manager dies with the
                                    SIGTERM that asks for a final save
``writer_workers_exit_with_parent``  a checkpoint writer worker whose trainer is killed mid-save
                                    waits forever on queues the trainer was to feed
``rank_zero_without_process_group``  ``BlendedDataset`` calls ``torch.distributed.get_rank()``
                                    when it caches, which raises without a process group
``order_static_loader_after_replay``  ``StaticBufferLoader`` copies the next batch while the last
                                    CUDA-graph replay may still read its buffers
``forget_full_cuda_graphs``         captured graphs live in ``FullCudaGraphWrapper`` class
                                    attributes, replayed by the next trainer in the process
==================================  ===========================================================
"""

import contextlib
import functools
import multiprocessing
import os
import signal
from multiprocessing.managers import SyncManager
from typing import Iterator

import torch

_applied = False


def apply() -> None:
    """Installs the start-up patches (idempotent). Each leaves a kernel TE or apex supplies
    alone."""
    global _applied
    if _applied:
        return
    fused_rope()
    wgrad_accumulation()
    _applied = True


def require(what: str) -> None:
    """Raises unless ``apply()`` has run: ``what`` depends on its patches."""
    if not _applied:
        raise RuntimeError(
            f"{what} needs megatron_lpa's megatron-core patches: call "
            "megatron_lpa.platform.megatron_patches.apply() (or initialize_distributed) first."
        )


def fused_rope() -> None:
    """Fills megatron's fused-RoPE hook with ``megatron_lpa.ops.rope`` (one kernel each way
    instead of megatron's chunk/negate/cat/multiply/add chain) unless TE filled it."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_lpa.ops.rope import fused_apply_rotary_pos_emb

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb


def wgrad_accumulation() -> None:
    """Gives megatron's linears ``gradient_accumulation_fusion`` (weight gradients added straight
    into the fp32 ``main_grad``) with ``megatron_lpa.ops.wgrad_accumulation``'s GEMMs in place of
    apex's ``fused_weight_gradient_mlp_cuda``, unless apex is there."""
    from megatron.core.tensor_parallel import layers

    from megatron_lpa.ops import wgrad_accumulation as ours

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = ours
        layers._grad_accum_fusion_available = True


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """apex's ``multi_tensor_l2norm`` contract: ``(norm of all tensors [1], None)``."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """apex's ``multi_tensor_scale`` contract: ``dst = src * scale`` for each pair of tensors."""
    sources, destinations = tensor_lists
    if all(src is dst for src, dst in zip(sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    elif scale == 1.0:  # megatron's main-to-model parameter copy: no scaled temporaries needed
        torch._foreach_copy_(destinations, sources)
    else:
        torch._foreach_copy_(destinations, torch._foreach_mul(sources, scale))


def _multi_tensor_hooks() -> tuple:
    """(module, attribute, megatron's fallback, ours) of each multi-tensor hook."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    return (
        (clip_grads, "l2_norm_impl", mcore_utils.local_multi_tensor_l2_norm, _foreach_l2_norm),
        (
            clip_grads,
            "multi_tensor_scale_impl",
            mcore_utils.local_multi_tensor_scale,
            _foreach_scale,
        ),
        (
            mcore_optimizer,
            "multi_tensor_scale_impl",
            mcore_utils.local_multi_tensor_scale,
            _foreach_scale,
        ),
    )


def use_multi_tensor_kernels(enabled: bool) -> None:
    """Fills megatron's multi-tensor grad-norm and scale hooks (taken from apex or TE when they
    are there) with torch's foreach kernels, or, ``enabled=False``, puts megatron's own fallbacks
    back (``--no-fused-kernels``). Leaves apex's or TE's kernels alone."""
    for module, name, fallback, ours in _multi_tensor_hooks():
        if getattr(module, name) in (fallback, ours):
            setattr(module, name, ours if enabled else fallback)


def _writer_queue_manager_start(trainer_pid: int) -> None:
    """Runs first in the writer queue's manager process (see ``shield_checkpoint_writer_queue``)."""
    from megatron_lpa.platform.parent_watch import exit_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(trainer_pid)


def shield_checkpoint_writer_queue() -> None:
    """Serves megatron-core's checkpoint-writer result queue from a process that ignores SIGTERM
    and ends with this one (call before the first save).

    megatron-core starts that queue's Manager process at the first save and reuses it. torchrun
    forwards SIGTERM to each worker's whole process group, so the Manager would die with the
    signal that asks for a final save, and that save would fail with BrokenPipeError. Ignoring
    SIGTERM, it would outlive a trainer killed with SIGKILL, so it watches the trainer.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(_writer_queue_manager_start, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


def writer_workers_exit_with_parent() -> None:
    """Makes each checkpoint writer worker end with the process that forked it (call before the
    first save; idempotent).

    At each save megatron-core forks the workers that write a rank's files
    (``FileSystemWriterAsync.write_preloaded_data``) and waits for them on a ``JoinableQueue``.
    Each worker ends with ``count_queue.get()`` and ``count_queue.task_done()``: the first waits
    for a token the trainer's queue feeder thread writes, the second for the trainer waiting in
    ``count_queue.join()`` to wake. A trainer killed mid-save (SIGKILL, or a rank ended by
    ``exit_with_parent`` after torchrun was killed) does neither, and the worker, holding both
    ends of those pipes itself, waits forever, keeping multiprocessing's resource tracker alive
    with it (it inherited the tracker's pipe).
    """
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data
    if getattr(write, "exits_with_parent", False):
        return

    @functools.wraps(write)  # keeps its signature, which megatron-core inspects
    def write_preloaded_data(*args, **kwargs):
        from megatron_lpa.platform.parent_watch import exit_with_parent

        parent = multiprocessing.parent_process()  # its pid was taken in the parent, before fork
        if parent is not None:
            exit_with_parent(parent.pid)
        return write(*args, **kwargs)

    write_preloaded_data.exits_with_parent = True
    FileSystemWriterAsync.write_preloaded_data = staticmethod(write_preloaded_data)


@contextlib.contextmanager
def rank_zero_without_process_group() -> Iterator[None]:
    """Within it, a lone process without a process group is rank 0 to ``BlendedDataset``."""
    if torch.distributed.is_initialized():
        yield
        return
    get_rank = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = get_rank


def order_static_loader_after_replay(wrapper) -> None:
    """Makes a ``FullCudaGraphWrapper``'s next input copy wait for everything queued so far.

    megatron's ``StaticBufferLoader`` copies the next batch into the graph's input buffers on its
    own stream without waiting for the last replay, which may still read them: back-to-back
    validation replays read one batch's tokens against the next one's labels (BENCHMARKS.md).
    Call before each replay.
    """
    wrapper.static_loader.stream.wait_stream(torch.cuda.current_stream())


def forget_full_cuda_graphs() -> None:
    """Drops the graphs and static inputs megatron keeps in ``FullCudaGraphWrapper``'s and
    ``StaticBufferLoader``'s class attributes, so a later trainer in the same process
    (``benchmarks/bench_train.py``) captures its own instead of replaying this one's."""
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader

    FullCudaGraphWrapper.curr_iteration = {"training": 0, "validation": 0}
    FullCudaGraphWrapper.cuda_graph = {"training": None, "validation": None}
    FullCudaGraphWrapper.result = {"training": None, "validation": None}
    StaticBufferLoader.static_buffers = {"training": [], "validation": []}
