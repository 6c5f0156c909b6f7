"""Each of megatron_patches' changes against the installed megatron-core: still needed
(megatron-core without it behaves as the patch's docstring says) and still working (with it, the
behaviour we
rely on). A megatron-core upgrade that makes a patch unnecessary or breaks it fails here."""

import json
import subprocess
import sys

import pytest
import torch

from megatron_lpa.platform import megatron_patches

# megatron-core as a fresh process imports it, before any patch.
_UNPATCHED_STATE = r"""
import inspect, json
from megatron.core import utils
from megatron.core.datasets import blended_dataset
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer
from megatron.core.tensor_parallel import layers
from megatron.core.extensions.transformer_engine import HAVE_TE
print(json.dumps({
    "have_te": HAVE_TE,
    "rope_hook": rope_utils.fused_apply_rotary_pos_emb is None,
    "wgrad_available": layers._grad_accum_fusion_available,
    "l2_norm_is_local": clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm,
    "scale_is_local": optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale,
    "writer_queue": filesystem_async._results_queue is None,
    "writer_workers_forked": 'mp.get_context("fork")' in inspect.getsource(
        filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc),
    "writer_worker_waits_for_its_parent": "count_queue.task_done()" in inspect.getsource(
        filesystem_async.FileSystemWriterAsync.write_preloaded_data),
    "blend_asks_rank": "torch.distributed.get_rank()" in inspect.getsource(blended_dataset),
    "graph_class_state": sorted(k for k in ("curr_iteration", "cuda_graph", "result")
                                if isinstance(vars(FullCudaGraphWrapper).get(k), dict)),
    "static_buffers": isinstance(vars(StaticBufferLoader).get("static_buffers"), dict),
    "static_loader_stream": "self.stream" in inspect.getsource(StaticBufferLoader),
}))
"""


@pytest.fixture(scope="module")
def unpatched() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _UNPATCHED_STATE], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_megatron_core_still_lacks_what_the_patches_supply(unpatched):
    if unpatched["have_te"]:
        pytest.skip("Transformer Engine supplies the kernels the patches fill in")
    assert unpatched["rope_hook"], "megatron-core fills its fused-RoPE hook itself now"
    assert not unpatched["wgrad_available"], "megatron-core has its own wgrad accumulation now"
    assert unpatched["l2_norm_is_local"] and unpatched["scale_is_local"], (
        "megatron-core's multi-tensor hooks are no longer its local per-tensor fallbacks"
    )


def test_megatron_core_state_the_patches_reset_is_still_where_they_reset_it(unpatched):
    assert unpatched["writer_queue"], "filesystem_async._results_queue moved or starts filled"
    assert unpatched["writer_workers_forked"] and unpatched["writer_worker_waits_for_its_parent"], (
        "megatron-core's checkpoint writer workers changed: writer_workers_exit_with_parent may "
        "be unnecessary"
    )
    assert unpatched["blend_asks_rank"], (
        "BlendedDataset no longer asks torch.distributed.get_rank(): "
        "rank_zero_without_process_group may be unnecessary"
    )
    assert unpatched["graph_class_state"] == ["cuda_graph", "curr_iteration", "result"]
    assert unpatched["static_buffers"] and unpatched["static_loader_stream"]


def test_writer_workers_patch_keeps_the_signature_megatron_core_inspects():
    """``write_preloaded_data_multiproc`` counts its parameters; tests/fault/
    test_process_hygiene.py checks that a worker ends with its killed trainer."""
    import inspect

    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    before = inspect.signature(FileSystemWriterAsync.write_preloaded_data)
    megatron_patches.writer_workers_exit_with_parent()
    megatron_patches.writer_workers_exit_with_parent()  # idempotent
    patched = FileSystemWriterAsync.write_preloaded_data
    assert patched.exits_with_parent and inspect.signature(patched) == before
    assert not getattr(patched.__wrapped__, "exits_with_parent", False)


def test_fused_rope_hook_matches_megatrons_unfused_rope():
    from megatron.core.models.common.embeddings import rope_utils

    megatron_patches.apply()
    torch.manual_seed(0)
    t = torch.randn(8, 2, 4, 16, requires_grad=True)
    freqs = torch.randn(8, 1, 1, 16)
    fused = rope_utils.fused_apply_rotary_pos_emb(t, freqs)
    unfused = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    torch.testing.assert_close(fused, unfused)
    grad = torch.randn_like(fused)
    (fused_grad,) = torch.autograd.grad(fused, t, grad)
    (unfused_grad,) = torch.autograd.grad(unfused, t, grad)
    torch.testing.assert_close(fused_grad, unfused_grad)


def test_wgrad_hook_gives_megatrons_linears_an_accumulating_gemm():
    from megatron.core.tensor_parallel import layers

    megatron_patches.apply()
    assert layers._grad_accum_fusion_available
    x, grad_out, main_grad = torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5)
    expected = main_grad + grad_out.t() @ x
    layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x, grad_out, main_grad)
    torch.testing.assert_close(main_grad, expected)


def test_multi_tensor_kernels_toggle_between_ours_and_megatrons():
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    tensors = [torch.randn(4), torch.randn(3, 2)]
    megatron_patches.use_multi_tensor_kernels(enabled=False)
    assert clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm
    megatron_patches.use_multi_tensor_kernels(enabled=True)
    norm, _ = clip_grads.l2_norm_impl(65536, None, [tensors], False)
    torch.testing.assert_close(norm, torch.cat([t.flatten() for t in tensors]).norm().reshape(1))


def test_a_config_with_fused_rope_says_the_patches_are_needed():
    """Building a config installs nothing: without apply() it says what to call."""
    code = (
        "import torch\nfrom megatron_lpa.models.lpa_config import LPAConfig\n"
        "LPAConfig(num_layers=1, hidden_size=32, num_attention_heads=4, "
        "use_cpu_initialization=True, position_embedding_type='rope')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "megatron_patches.apply()" in out.stderr, out.stderr[-2000:]
