"""SDPA core attention (``--core-attention sdpa``, the default) computes what megatron-core's own
``DotProductAttention`` (``--core-attention local``) computes: the same outputs and gradients in
fp32, causal or with an explicit mask, with and without grouped-query attention, and the same loss
and parameter gradients for a whole LPA model."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lpa.layers.sdpa_attention import SDPAttention
from megatron_lpa.models.builder import build_model
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.platform.distributed import set_seed

SEQ, BATCH, HEADS, HEAD_DIM = 12, 3, 8, 16


@pytest.fixture
def seeded(model_parallel):
    """megatron's DotProductAttention forks the model-parallel RNG stream even without dropout."""
    set_seed(1234)


def config(groups: int) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=groups,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )


def both(cfg: TransformerConfig):
    kwargs = dict(
        config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    return SDPAttention(**kwargs), DotProductAttention(**kwargs)


def document_mask() -> torch.Tensor:
    """megatron's [b, 1, s, s] boolean mask (True = masked out): causal within documents that
    end at different places in each sample; every row keeps its diagonal."""
    ends = [[5, 12], [3, 7, 12], [12]]
    mask = torch.ones(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
    for b, sample_ends in enumerate(ends):
        start = 0
        for end in sample_ends:
            block = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            mask[b, 0, start:end, start:end] = ~block
            start = end
    return mask


@pytest.mark.parametrize("groups", [HEADS, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("masking", ["causal", "documents"])
def test_sdpa_matches_megatron_dot_product_attention(seeded, groups, masking):
    """Outputs [s, b, h*d] and the gradients of q, k and v agree to fp32 rounding (values of
    order 1; the two sum in different orders, so 1e-5 absolute)."""
    sdpa, local = both(config(groups))
    torch.manual_seed(0)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM)
    k, v = (torch.randn(SEQ, BATCH, groups, HEAD_DIM) for _ in range(2))
    # Causal: no mask tensor, as the trainer passes without document masking.
    mask = None if masking == "causal" else document_mask()
    inputs = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    outputs = [module(*tensors, mask) for module, tensors in zip((sdpa, local), inputs)]
    assert outputs[0].shape == (SEQ, BATCH, HEADS * HEAD_DIM)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(grad)
    for name, mine, theirs in zip("qkv", *inputs):
        torch.testing.assert_close(
            mine.grad, theirs.grad, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}"
        )


def test_causal_attention_is_causal(seeded):
    """What both are compared on is causal: the first position's output does not change when
    later keys and values do (a mask dropped by both would still pass the comparison)."""
    sdpa, _ = both(config(2))
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM)
    k, v = (torch.randn(SEQ, BATCH, 2, HEAD_DIM) for _ in range(2))
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[1:] += 1.0
    changed_v[1:] += 1.0
    torch.testing.assert_close(sdpa(q, k, v, None)[0], sdpa(q, changed_k, changed_v, None)[0])
    assert not torch.allclose(sdpa(q, k, v, None)[-1], sdpa(q, changed_k, changed_v, None)[-1])


def tiny_lpa(core_attention: str) -> LPAConfig:
    return LPAConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=96,
        vocab_size=128,
        max_sequence_length=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        position_embedding_type="rope",
        lpa_attn_rank=12,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        core_attention=core_attention,
    )


def test_lpa_model_loss_and_gradients_do_not_depend_on_core_attention(seeded):
    """The same LPA model (GQA, RoPE) with either kernel: the same per-token losses and the same
    gradient for every parameter."""
    sdpa_model, local_model = build_model(tiny_lpa("sdpa")), build_model(tiny_lpa("local"))
    for model, kind in ((sdpa_model, SDPAttention), (local_model, DotProductAttention)):
        kernels = {type(layer.self_attention.core_attention) for layer in model.decoder.layers}
        assert kernels == {kind}, kernels
    local_model.load_state_dict(sdpa_model.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(3)
    data = torch.randint(0, 128, (BATCH, SEQ + 1), generator=generator)
    tokens, labels = data[:, :-1], data[:, 1:]
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    losses = [model(tokens, positions, None, labels=labels) for model in (sdpa_model, local_model)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for loss in losses:
        loss.mean().backward()
    local_params = dict(local_model.named_parameters())
    for name, param in sdpa_model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(
            param.grad,
            local_params[name].grad,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, name=name: f"grad {name}: {m}",
        )
