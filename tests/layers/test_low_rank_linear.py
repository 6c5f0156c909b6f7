"""The LPA layers compute exactly B(A x) per projection: checked against two nn.Linear each."""

import math
import warnings

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from megatron_lpa.layers.low_rank_linear import (
    LowRankColumnParallelLinear,
    LowRankRowParallelLinear,
)

D, R, SEQ, BATCH = 48, 8, 5, 3


def config(**overrides):
    base = dict(
        num_layers=2,
        hidden_size=D,
        num_attention_heads=6,
        num_query_groups=2,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    return TransformerConfig(**{**base, **overrides})


def pair(a_weight, b_weight, down_bias=None, up_bias=None):
    """The paper's projection: two plain linears with nothing in between; a column slot's bias is
    on the first (r-wide) one, a row slot's on the second."""
    down = torch.nn.Linear(a_weight.shape[1], a_weight.shape[0], bias=down_bias is not None)
    up = torch.nn.Linear(b_weight.shape[1], b_weight.shape[0], bias=up_bias is not None)
    with torch.no_grad():
        down.weight.copy_(a_weight)
        up.weight.copy_(b_weight)
        if down_bias is not None:
            down.bias.copy_(down_bias)
        if up_bias is not None:
            up.bias.copy_(up_bias)
    return torch.nn.Sequential(down, up)


def assert_same_forward_backward(layer, reference_fn, reference_params, x):
    x_layer = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out, _ = layer(x_layer)
    expected = reference_fn(x_ref)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_layer.grad, x_ref.grad)
    for mine, theirs in reference_params:
        # assert_close(None, None) passes: a factor cut off from the graph on both sides would.
        assert mine.grad is not None and theirs.grad is not None
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_qkv_column_is_three_independent_pairs_in_megatron_layout(model_parallel):
    cfg = config(add_bias_linear=True)
    heads, groups, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    q_out, kv_out = heads * hn, groups * hn
    layer = LowRankColumnParallelLinear(
        D,
        q_out + 2 * kv_out,
        config=cfg,
        init_method=cfg.init_method,
        lpa_rank=R,
        projections="qkv",
        bias=True,
    )
    # The bias is A's: r wide per projection, not the full output width.
    assert layer.down_bias.shape == (3 * R,)
    assert [n for n, _ in layer.named_parameters()] == [
        "down_weight",
        "up_weight_q",
        "up_weight_k",
        "up_weight_v",
        "down_bias",
    ]
    with torch.no_grad():
        layer.down_bias.normal_()
    a, c = layer.down_weight.detach(), layer.down_bias.detach()
    q, k, v = (
        pair(a[i * R : (i + 1) * R], up.detach(), c[i * R : (i + 1) * R])
        for i, up in enumerate(layer.up_weights())
    )

    def reference(x):
        # megatron's fused layout: per query group g, [q heads of g, k_g, v_g].
        parts = [
            q(x).view(SEQ, BATCH, groups, -1),
            k(x).view(SEQ, BATCH, groups, -1),
            v(x).view(SEQ, BATCH, groups, -1),
        ]
        return torch.cat(parts, dim=-1).view(SEQ, BATCH, -1)

    x = torch.randn(SEQ, BATCH, D)
    out, bias = layer(x)
    assert bias is None
    # Weight gradients: each B against its pair's second linear, A's rows and bias per projection.
    factors = [(up, module[1].weight) for up, module in zip(layer.up_weights(), (q, k, v))]
    assert_same_forward_backward(layer, reference, factors, x)
    torch.testing.assert_close(
        layer.down_weight.grad, torch.cat([m[0].weight.grad for m in (q, k, v)])
    )
    torch.testing.assert_close(layer.down_bias.grad, torch.cat([m[0].bias.grad for m in (q, k, v)]))


def test_split_qkv_output_is_the_fused_layout_before_interleaving(model_parallel):
    """What LowRankSelfAttention reads: q, k and v with their share of the bias, gradients too."""
    cfg = config(add_bias_linear=True)
    q_out, kv_out = (
        cfg.num_attention_heads * cfg.kv_channels,
        cfg.num_query_groups * cfg.kv_channels,
    )
    kwargs = dict(config=cfg, init_method=cfg.init_method, lpa_rank=R, projections="qkv", bias=True)
    fused = LowRankColumnParallelLinear(D, q_out + 2 * kv_out, **kwargs)
    split = LowRankColumnParallelLinear(D, q_out + 2 * kv_out, split_output=True, **kwargs)
    with torch.no_grad():
        fused.down_bias.normal_()
    split.load_state_dict(fused.state_dict())
    x = torch.randn(SEQ, BATCH, D)
    (q, k, v), bias = split(x)
    assert bias is None and q.shape[-1] == q_out and k.shape[-1] == v.shape[-1] == kv_out
    out, _ = fused(x)
    groups = cfg.num_query_groups
    expected = torch.cat([t.view(SEQ, BATCH, groups, -1) for t in (q, k, v)], dim=-1)
    torch.testing.assert_close(out, expected.view(SEQ, BATCH, -1))
    grad = torch.randn_like(out)
    out.backward(grad)
    grads = grad.view(SEQ, BATCH, groups, -1).split(
        [q_out // groups, kv_out // groups, kv_out // groups], dim=-1
    )
    torch.autograd.backward([q, k, v], [g.reshape(SEQ, BATCH, -1) for g in grads])
    for mine, theirs in zip(split.parameters(), fused.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_gate_up_column_returns_megatron_glu_layout_with_the_bias_inside(model_parallel):
    cfg = config(gated_linear_unit=True, add_bias_linear=True)
    ffn = 40
    layer = LowRankColumnParallelLinear(
        D,
        2 * ffn,
        config=cfg,
        init_method=cfg.init_method,
        lpa_rank=R,
        projections="gate_up",
        bias=True,
        skip_bias_add=True,
    )
    with torch.no_grad():
        layer.down_bias.normal_()
    a, c = layer.down_weight.detach(), layer.down_bias.detach()
    gate = pair(a[:R], layer.up_weight_gate.detach(), c[:R])
    up = pair(a[R:], layer.up_weight_up.detach(), c[R:])
    x = torch.randn(SEQ, BATCH, D)
    out, bias = layer(x)
    assert bias is None  # added on A's output already, nothing left for megatron's MLP to add
    torch.testing.assert_close(out, torch.cat([gate(x), up(x)], dim=-1))
    layer.zero_grad()
    assert_same_forward_backward(
        layer,
        lambda t: torch.cat([gate(t), up(t)], dim=-1),
        [(layer.up_weight_gate, gate[1].weight), (layer.up_weight_up, up[1].weight)],
        x,
    )
    torch.testing.assert_close(
        layer.down_weight.grad, torch.cat([gate[0].weight.grad, up[0].weight.grad])
    )
    torch.testing.assert_close(
        layer.down_bias.grad, torch.cat([gate[0].bias.grad, up[0].bias.grad])
    )


def test_row_is_one_pair_with_bias(model_parallel):
    cfg = config(add_bias_linear=True)
    layer = LowRankRowParallelLinear(
        D,
        32,
        config=cfg,
        init_method=cfg.init_method,
        lpa_rank=R,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
    )
    with torch.no_grad():
        layer.bias.normal_()
    reference = pair(
        layer.down_weight.detach(), layer.up_weight.detach(), up_bias=layer.bias.detach()
    )
    x = torch.randn(SEQ, BATCH, D)
    assert_same_forward_backward(
        layer,
        reference,
        [
            (layer.down_weight, reference[0].weight),
            (layer.up_weight, reference[1].weight),
            (layer.bias, reference[1].bias),
        ],
        x,
    )


def test_linear_init_matches_nn_linear_bounds(model_parallel):
    cfg = config()
    layer = LowRankRowParallelLinear(
        D,
        64,
        config=cfg,
        init_method=cfg.init_method,
        lpa_rank=R,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
    )
    assert layer.down_weight.abs().max() <= 1 / math.sqrt(D)
    assert layer.down_weight.abs().max() > 0.9 / math.sqrt(D)
    assert layer.up_weight.abs().max() <= 1 / math.sqrt(R)
    assert layer.up_weight.abs().max() > 0.9 / math.sqrt(R)


def test_variance_init_gives_product_the_dense_variance(model_parallel):
    sigma = 0.02
    cfg = config(hidden_size=512, num_attention_heads=8, num_query_groups=8)
    torch.manual_seed(0)
    layer = LowRankRowParallelLinear(
        512,
        512,
        config=cfg,
        init_method=init_method_normal(sigma),
        lpa_rank=64,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
        lpa_init="variance",
    )
    product = layer.up_weight @ layer.down_weight
    assert product.std().item() == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("rank,message", [(0, ">= 1"), (-3, ">= 1"), (49, "exceeds its width")])
def test_bad_rank_is_a_clear_error(model_parallel, rank, message):
    cfg = config()
    with pytest.raises(ValueError, match=message):
        LowRankRowParallelLinear(
            D,
            D,
            config=cfg,
            init_method=cfg.init_method,
            lpa_rank=rank,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )


def test_rank_that_saves_nothing_warns(model_parallel):
    cfg = config()
    with pytest.warns(UserWarning, match="at least as many parameters"):
        LowRankRowParallelLinear(
            D,
            D,
            config=cfg,
            init_method=cfg.init_method,
            lpa_rank=D // 2,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LowRankRowParallelLinear(
            D,
            D,
            config=cfg,
            init_method=cfg.init_method,
            lpa_rank=D // 2 - 1,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )
    assert not [w for w in caught if "at least as many" in str(w.message)]


@pytest.mark.parametrize("slot", ["qkv", "gate_up", "row"])
def test_gradient_accumulation_fusion_adds_factor_grads_into_main_grad(
    model_parallel, monkeypatch, slot
):
    """megatron's accumulation fusion (GPU runs): each factor's gradient is added to its fp32
    ``main_grad`` in the backward (no ``.grad``), equal to the unfused layer's gradient."""
    from megatron.core.tensor_parallel import layers

    from megatron_lpa.ops import wgrad_accumulation

    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", wgrad_accumulation, raising=False)

    def build(fusion):
        cfg = config(add_bias_linear=True, gradient_accumulation_fusion=fusion)
        kwargs = dict(config=cfg, init_method=cfg.init_method, lpa_rank=R, bias=True)
        if slot == "row":
            return LowRankRowParallelLinear(
                D, 32, input_is_parallel=True, skip_bias_add=False, **kwargs
            )
        if slot == "gate_up":
            return LowRankColumnParallelLinear(
                D, 2 * 40, projections="gate_up", skip_bias_add=True, **kwargs
            )
        out = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
        return LowRankColumnParallelLinear(D, out, projections="qkv", split_output=True, **kwargs)

    fused, plain = build(True), build(False)
    plain.load_state_dict(fused.state_dict())
    biases = [name for name, _ in fused.named_parameters() if name.endswith("bias")]
    factors = {name: p for name, p in fused.named_parameters() if name not in biases}
    before = {}
    for name, p in factors.items():
        p.main_grad = torch.randn(p.shape)
        before[name] = p.main_grad.clone()
    x = torch.randn(SEQ, BATCH, D)
    outputs = [fused(x.clone().requires_grad_())[0], plain(x)[0]]
    outputs = [torch.cat(o, -1) if isinstance(o, list) else o for o in outputs]
    torch.testing.assert_close(outputs[0], outputs[1])
    grad = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(grad)
    plain_params = dict(plain.named_parameters())
    for name, p in factors.items():
        assert p.grad is None
        torch.testing.assert_close(p.main_grad, before[name] + plain_params[name].grad)
    for name in biases:
        torch.testing.assert_close(fused.get_parameter(name).grad, plain.get_parameter(name).grad)
