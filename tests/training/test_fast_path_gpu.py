"""The GPU fast path end to end: fused kernels and the full-iteration CUDA graph take the same
training steps as megatron-core's unfused eager path (bf16, so within bf16 rounding)."""

import pytest
import torch
from megatron.core.full_cuda_graph import FullCudaGraphWrapper

from megatron_lpa.config.command_line import parse_args
from megatron_lpa.config.presets import model_flags
from megatron_lpa.training.trainer import Trainer

pytestmark = pytest.mark.gpu

STEPS = 8
# name: (preset variant, flags). paper_block: the paper's GPT-style block (a norm inside each
# output slot, no final norm), an output-layer bias and PyTorch-default init, through the same
# fused kernels and graph.
VARIANTS = {
    "dense": ("dense", ()),
    "lpa": ("lpa", ()),
    "paper_block": (
        "lpa",
        ("--sublayer-norm", "output", "--output-layer-bias", "--init-style", "pytorch"),
    ),
}


def train(name: str, *flags: str) -> tuple:
    variant, variant_flags = VARIANTS[name]
    cfg = parse_args(
        model_flags("tiny", variant)
        + list(variant_flags)
        + (
            "--mock-data --vocab-size 128 --micro-batch-size 8 --global-batch-size 16 --lr 3e-3 "
            "--train-iters 100 --eval-iters 5 --eval-interval 4 --bf16 --hidden-dropout 0 "
            "--attention-dropout 0 --num-workers 0"
        ).split()
        + list(flags)
    )
    trainer = Trainer(cfg)
    # Fused: weight gradients go straight into megatron's fp32 buffers (its accumulation fusion).
    assert trainer.config.gradient_accumulation_fusion is not cfg.compute.no_fused_kernels
    losses, grad_norms = [], []
    for _ in range(STEPS):
        loss_sum, tokens, grad_norm, skipped = trainer.train_step().tolist()
        assert not skipped
        losses.append(loss_sum / tokens)
        grad_norms.append(grad_norm)
    # Ten validation calls: three eager, the capture, then back-to-back replays.
    losses.append(trainer.evaluate(trainer.valid_iterator, "validation"))
    losses.append(trainer.evaluate(trainer.valid_iterator, "validation"))
    captured = all(
        FullCudaGraphWrapper.cuda_graph[stage] is not None for stage in ("training", "validation")
    )
    trainer.close(keep_process_group=True)
    return losses, grad_norms, captured


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_kernels_and_cuda_graph_follow_the_unfused_eager_losses(variant):
    unfused, unfused_norms, _ = train(variant, "--no-fused-kernels")
    fused, fused_norms, _ = train(variant)
    graphed, graphed_norms, captured = train(variant, "--cuda-graph")
    assert captured, "training or validation was never captured in a CUDA graph"
    assert len(set(unfused)) > 1, "the loss should move"
    # Training losses, then two validation losses (replays once read the next batch's labels).
    for step, (a, b, c) in enumerate(zip(unfused, fused, graphed)):
        assert abs(a - b) < 2e-2, f"step {step}: unfused {a} vs fused {b}"
        assert abs(b - c) < 1e-3, f"step {step}: eager {b} vs graph replay {c}"
    # A weight gradient lost or counted twice on the way into the fp32 buffers shows in the norm.
    for step, (a, b, c) in enumerate(zip(unfused_norms, fused_norms, graphed_norms)):
        assert b == pytest.approx(a, rel=3e-2), f"step {step}: grad norm unfused {a} vs fused {b}"
        assert c == pytest.approx(b, rel=1e-2), f"step {step}: grad norm eager {b} vs graph {c}"


@pytest.mark.parametrize("flags", [(), ("--cuda-graph",)], ids=["eager", "graph"])
def test_a_training_step_is_queued_without_waiting_for_the_device(flags):
    """No host sync in a step: the host can queue the next step while the device runs this one."""
    cfg = parse_args(
        model_flags("tiny", "lpa")
        + (
            "--mock-data --vocab-size 128 --micro-batch-size 8 --global-batch-size 16 --lr 3e-3 "
            "--train-iters 100 --eval-iters 0 --bf16 --num-workers 0"
        ).split()
        + list(flags)
    )
    trainer = Trainer(cfg)
    for _ in range(5):  # past the graph's warm-up and capture, which do synchronise
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of device time ahead of the step
    busy = torch.cuda.Event()
    busy.record()
    stats = trainer.train_step()
    assert not busy.query(), "train_step waited for the device"
    assert stats.tolist()[3] == 0.0, "the step went ahead"
    trainer.close(keep_process_group=True)
