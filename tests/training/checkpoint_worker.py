"""Worker for ``test_checkpointing.py``: trains a tiny model, saving and resuming checkpoints.

Runs under torchrun (or alone as a world of one). Trains iterations ``start+1 .. --iters`` with
Adam, warmup + cosine LR, gradient clipping and dropout on, where ``start`` is 0 or the loaded
checkpoint's iteration; the batch of iteration i depends only on i. Writes a JSON report
(``--report``, from global rank 0): the loss of every iteration it ran, the Adam ``step`` of every
parameter right after loading and after the first step, and the loss of a fixed evaluation batch
after loading and at the end.

Test-only crash points (``--crash``) kill this process with SIGKILL during the save of iteration
``--crash-at``: ``mid_write`` after the first file of the checkpoint is written, ``before_pointer``
when the checkpoint directory is in place but the pointer has not moved yet. ``--pause-after``
sleeps after saving that iteration, for a test that kills the process from outside.
"""

import argparse
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lpa.checkpointing import checkpoint, files
from megatron_lpa.models.builder import build_model
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed, set_seed

SEQ, MICRO_BATCH, VOCAB = 16, 2, 128


def tiny_config(tp: int) -> LPAConfig:
    """A 2-layer LLaMA-style LPA model with hidden dropout on, so resuming needs the RNG state."""
    return LPAConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        lpa_attn_rank=8,
        hidden_dropout=0.1,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        position_embedding_type="rope",
        tensor_model_parallel_size=tp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        finalize_model_grads_func=finalize_model_grads,
    )


def build(args):
    """Model chunks, optimizer and LR scheduler for this layout, initialised from seed 1234."""
    config = tiny_config(args.tp)
    set_seed(1234)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.dist_opt
    )
    model = [DistributedDataParallel(config, ddp_config, build_model(config))]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            min_lr=1e-3,
            weight_decay=0.01,
            clip_grad=1.0,
            params_dtype=torch.float32,
            use_distributed_optimizer=args.dist_opt,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=1e-2,
        min_lr=1e-3,
        lr_warmup_steps=2,
        lr_decay_steps=6,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=6,
        wd_incr_style="constant",
    )
    return model, optimizer, scheduler


def batch(seed: int):
    """This DP rank's micro-batch of a global batch that depends only on ``seed``."""
    dp_size = parallel_state.get_data_parallel_world_size()
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (dp_size, MICRO_BATCH, SEQ + 1), generator=generator)
    mine = data[parallel_state.get_data_parallel_rank()]
    return mine[:, :-1], mine[:, 1:], torch.arange(SEQ).expand(MICRO_BATCH, SEQ)


def forward_step(data_iterator, model):
    tokens, labels, positions = next(data_iterator)
    losses = model(tokens, positions, None, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach()}

    return losses, loss_func


def run_batch(model, data, forward_only: bool) -> float:
    """Forward (and backward) of one micro-batch; the loss averaged over DP ranks."""
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([data]),
        model=model,
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )
    loss = losses[0]["loss"].clone()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return float(loss) / parallel_state.get_data_parallel_world_size()


def train_step(model, optimizer, scheduler, iteration: int) -> float:
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run_batch(model, batch(iteration), forward_only=False)
    optimizer.step()
    scheduler.step(increment=1)
    return loss


def eval_loss(model) -> float:
    """Loss on a fixed batch with dropout off (no RNG drawn)."""
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        loss = run_batch(model, batch(10_000), forward_only=True)
    for chunk in model:
        chunk.train()
    return loss


def adam_steps(optimizer) -> dict:
    """Every parameter's Adam ``step`` value, and whether each has a tensor of its own."""
    states = [s for sub in optimizer.chained_optimizers for s in sub.optimizer.state.values()]
    steps = [s["step"] for s in states]
    return {
        "values": [float(s) for s in steps],
        "distinct": len({id(s) for s in steps}) == len(steps),
    }


def arm_crash(kind: str) -> None:
    """Makes the next checkpoint save kill this process (SIGKILL) at the point ``kind`` names."""

    def die():
        print(f"CRASH POINT {kind} reached", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "mid_write":
        real_save, calls = torch.save, []

        def save_then_die_on_second(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                die()
            return real_save(*args, **kwargs)

        torch.save = save_then_die_on_second
    else:
        real_replace = os.replace

        def die_at_pointer(src, dst, *args, **kwargs):
            if Path(dst).name == files.TRACKER_FILENAME:
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = die_at_pointer


def use_forked_result_queue() -> None:
    """Hands dist_checkpointing a result queue from a forked manager process.

    It spawns one on the first save, and the spawned process re-imports this script (torch and
    megatron-core): about 4 s per saving process on two cores. The queue only carries the writers'
    results back; what gets written is the same.
    """
    filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--load")
    parser.add_argument("--no-load-optim", action="store_true")
    parser.add_argument("--save")
    parser.add_argument("--save-interval", type=int, default=3)
    parser.add_argument("--crash", choices=("mid_write", "before_pointer"))
    parser.add_argument("--crash-at", type=int, default=0)
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()

    use_forked_result_queue()
    initialize_distributed(args.tp)
    model, optimizer, scheduler = build(args)
    report = {"losses": {}}
    start = 0
    if args.load:
        state = checkpoint.load_checkpoint(
            args.load, model, optimizer, scheduler, load_optim=not args.no_load_optim
        )
        start = state["iteration"]
        report["train_state"] = state
        report["eval_loss_after_load"] = eval_loss(model)
        if not args.no_load_optim:
            report["adam_steps_after_load"] = adam_steps(optimizer)
    for iteration in range(start + 1, args.iters + 1):
        report["losses"][iteration] = train_step(model, optimizer, scheduler, iteration)
        if iteration == start + 1:
            report["adam_steps_after_first_step"] = adam_steps(optimizer)
        if args.save and iteration % args.save_interval == 0:
            if args.crash and iteration == args.crash_at:
                arm_crash(args.crash)
            train_state = {"iteration": iteration, "consumed_train_samples": iteration * 2}
            checkpoint.save_checkpoint(
                args.save,
                iteration,
                model,
                optimizer,
                scheduler,
                train_state,
                config_dict={"tp": args.tp, "dist_opt": args.dist_opt},
            )
            if iteration == args.pause_after:
                print(f"PAUSED after saving iteration {iteration}", flush=True)
                time.sleep(600)
    report["eval_loss_at_end"] = eval_loss(model)
    if dist.get_rank() == 0:
        Path(args.report).write_text(json.dumps(report))
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
