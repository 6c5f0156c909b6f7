"""Process groups, model-parallel groups and seeds, for NCCL on GPUs and gloo on CPUs."""

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_lpa.platform import megatron_patches
from megatron_lpa.platform.cpu_support import enable_cpu_support


def device_type() -> str:
    """``cuda`` when a GPU is usable, else ``cpu`` (gloo and megatron-core's CPU support)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    timeout_minutes: float = 10.0,
) -> None:
    """Start-up: megatron-core's patches, the torchrun world (or a world of one without torchrun)
    and megatron's groups.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` as set by
    torchrun; without them, a world of one on a free local port. Data-parallel size is what is
    left: world / (TP * PP).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"{tensor_model_parallel_size} x --pipeline-model-parallel-size "
            f"{pipeline_model_parallel_size}; launch a multiple of {model_parallel} processes."
        )
    megatron_patches.apply()
    if device_type() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        enable_cpu_support()
        backend = "gloo"
    if not dist.is_initialized():
        # Without torchrun, a private port: setting MASTER_PORT here would leak into child
        # processes (tests, tools) and make their own process groups collide with this one.
        init_method = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )


def destroy_distributed(keep_process_group: bool = False) -> None:
    """Tears down megatron's groups and, unless kept for another model, the process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()


def set_seed(seed: int, graph_safe: bool = False) -> None:
    """Seeds like Megatron-LM: one stream per pipeline stage, plus per-TP-rank dropout streams.

    Every TP rank of a stage shares the default generator, so replicated parameters are initialised
    identically across TP ranks. ``graph_safe`` keeps the dropout streams as generators that a CUDA
    graph can register, so replays draw fresh random numbers (needed by ``--cuda-graph``).
    """
    # force_reset: a tracker of an earlier run in this process may be of the other kind.
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, use_cudagraphable_rng=graph_safe, force_reset_rng=True
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
