"""The optimizer fast path: fused AdamW and megatron's multi-tensor hooks filled with foreach
kernels,
computing what megatron-core's fallbacks compute, and switched back by enabled=False."""

from types import SimpleNamespace

import pytest
import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads

from megatron_lpa.training.optimizer import use_fused_kernels


def _megatron_like(params):
    """What the switch touches of a megatron optimizer: the torch optimizer inside."""
    return SimpleNamespace(optimizer=torch.optim.AdamW(params, lr=1e-2))


@pytest.fixture(autouse=True)
def restore_megatron_fallbacks():
    yield
    use_fused_kernels(_megatron_like([torch.nn.Parameter(torch.zeros(1))]), enabled=False)


def test_foreach_grad_norm_and_scale_match_megatrons_fallbacks():
    use_fused_kernels(_megatron_like([torch.nn.Parameter(torch.zeros(1))]))
    grads = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]
    norm, _ = clip_grads.l2_norm_impl(2048, None, [grads], False)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(norm, expected.reshape(1))
    scaled = [g.clone() for g in grads]
    clip_grads.multi_tensor_scale_impl(2048, None, [scaled, scaled], 0.5)
    for g, s in zip(grads, scaled):
        torch.testing.assert_close(s, g * 0.5)
    # megatron copies fp32 main parameters to the fp16 model's with scale 1 (and scales copies too).
    for scale in (1.0, 0.25):
        copies = [torch.full_like(g, float("nan"), dtype=torch.float16) for g in grads]
        clip_grads.multi_tensor_scale_impl(2048, None, [grads, copies], scale)
        for g, c in zip(grads, copies):
            torch.testing.assert_close(c, (g * scale).half())
    use_fused_kernels(_megatron_like([torch.nn.Parameter(torch.zeros(1))]), enabled=False)
    assert clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm


def test_fused_adamw_takes_the_same_steps_as_the_default():
    torch.manual_seed(0)
    start = torch.randn(4, 6)
    runs = []
    for enabled in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = _megatron_like([param])
        use_fused_kernels(optimizer, enabled=enabled)
        assert optimizer.optimizer.param_groups[0]["fused"] is (True if enabled else None)
        torch.manual_seed(1)
        for _ in range(5):
            param.grad = torch.randn_like(param)
            optimizer.optimizer.step()
        runs.append(param.detach())
    torch.testing.assert_close(runs[0], runs[1])


@pytest.fixture
def trainer_process_groups():
    """A Trainer builds megatron's groups itself: lend it a process without the session's (the
    ``model_parallel`` fixture's), then put those back for the tests after it."""
    from megatron.core import parallel_state

    from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed

    had_groups = parallel_state.model_parallel_is_initialized()
    if had_groups:
        destroy_distributed(keep_process_group=True)
    yield
    if had_groups:
        initialize_distributed()


def _trainer(*flags):
    from megatron_lpa.config.command_line import parse_args
    from megatron_lpa.config.presets import model_flags
    from megatron_lpa.training.trainer import Trainer

    return Trainer(
        parse_args(
            model_flags("tiny", "lpa")
            + (
                "--mock-data --vocab-size 128 --micro-batch-size 4 --global-batch-size 8 "
                "--lr 1e-2 --train-iters 10 --eval-iters 0 --num-workers 0 --hidden-dropout 0 "
                "--attention-dropout 0"
            ).split()
            + list(flags)
        )
    )


def test_step_without_host_sync_takes_megatrons_clipped_steps(trainer_process_groups):
    """Fused path (norm, clip and skip on the device) vs megatron's own host-side step."""
    runs = []
    for flags in ((), ("--no-fused-kernels",)):
        trainer = _trainer("--clip-grad", "0.05", *flags)  # below every norm: clipping is active
        stats = [trainer.train_step().tolist() for _ in range(3)]
        # Adam's update hardly depends on the gradients' scale; its first moment does.
        moments = [
            state["exp_avg"].clone()
            for state in trainer.optimizer.chained_optimizers[0].optimizer.state.values()
        ]
        trainer.close(keep_process_group=True)
        runs.append((stats, moments))
    (fused, fused_moments), (megatron, megatron_moments) = runs
    for (loss, tokens, norm, skipped), (loss_ref, tokens_ref, norm_ref, skipped_ref) in zip(
        fused, megatron
    ):
        assert norm > 0.05 and not skipped and not skipped_ref
        assert loss / tokens == pytest.approx(loss_ref / tokens_ref, rel=1e-5)
        assert norm == pytest.approx(norm_ref, rel=1e-5)
    assert len(fused_moments) == len(megatron_moments) > 0
    for moment, ref in zip(fused_moments, megatron_moments):
        torch.testing.assert_close(moment, ref, rtol=1e-4, atol=1e-7)


def test_non_finite_gradient_leaves_weights_and_adam_state_as_they_were(trainer_process_groups):
    trainer = _trainer()
    trainer.train_step()
    optimizer = trainer.optimizer
    prepare_grads = optimizer.prepare_grads

    def poisoned_prepare_grads():
        found_inf = prepare_grads()
        optimizer.get_main_grads_for_grad_norm()[0].view(-1)[0] = float("inf")
        return found_inf

    optimizer.prepare_grads = poisoned_prepare_grads
    inner = optimizer.chained_optimizers[0].optimizer
    before = (
        [p.detach().clone() for p in trainer.model[0].parameters()],
        {
            name: [state[name].clone() for state in inner.state.values()]
            for name in ("exp_avg", "exp_avg_sq", "step")
        },
    )
    loss_sum, tokens, grad_norm, skipped = trainer.train_step().tolist()
    assert skipped == 1.0 and not torch.isfinite(torch.tensor(grad_norm))
    for param, old in zip(trainer.model[0].parameters(), before[0]):
        torch.testing.assert_close(param.detach(), old, rtol=0, atol=0)
    for name, old in before[1].items():
        for state, value in zip(inner.state.values(), old):
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    optimizer.prepare_grads = prepare_grads
    assert trainer.train_step().tolist()[3] == 0.0, "the next finite step goes ahead"
    trainer.close(keep_process_group=True)
