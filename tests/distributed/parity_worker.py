"""torchrun worker: one training step of tiny models under a given TP/SP/PP layout.

Run under torchrun by ``test_parallel_parity.py``. For every variant it builds the model for this
layout, optionally loads weights from a distributed checkpoint (written at any layout: megatron-core
reshards), runs one step of megatron's schedule (2 micro-batches, so 1F1B pipelines), finalises the
gradients as training does (DP all-reduce, TP all-reduce of sequence-parallel grads), and then:

* ``--save-weights`` / ``--save-grads``: writes weights / gradients as distributed checkpoints, so a
  run at another layout can load them resharded to its own shards;
* ``--check-grads DIR``: loads reference gradients resharded to this rank's shards and compares;
* ``--loss-file``: writes the loss (last stage) or, with ``--check-loss``, compares with that file;
* ``--save-full DIR`` (TP=1): writes the plain state dict and every parameter's gradient;
* ``--load-full DIR`` (TP>1, PP=1): loads this rank's shards of that state dict, cut by the rules of
  ``tp_shards.py`` (not by the layers' own sharding), with ``strict=True``, and compares every
  parameter's gradient with its shard of the TP=1 gradient, cut by the same rules.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lpa.models.builder import build_model
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed, set_seed

try:
    from tests.distributed import tp_shards
except ImportError:  # run as a script by torchrun: this file's folder is on the path
    import tp_shards

SEQ, MICRO_BATCH, MICRO_BATCHES, VOCAB = 16, 2, 2, 128

VARIANTS = {
    # LLaMA-style with grouped-query attention (8 heads, 4 groups), dense and LPA.
    "dense": dict(family="llama", lpa_attn_rank=0, lpa_ffn_rank=0),
    "lpa": dict(family="llama", lpa_attn_rank=12, lpa_ffn_rank=0),
    # Low-rank everywhere: the SwiGLU gate/up pair in the column slot.
    "lowrank_all": dict(family="llama", lpa_attn_rank=12, lpa_ffn_rank=20),
    # GPT-style: LayerNorm, learned positions, biases (column bias inside, row bias returned).
    "lpa_gpt": dict(family="gpt", lpa_attn_rank=12, lpa_ffn_rank=20),
    # The paper's GPT-style block: sublayer outputs normalised, no final norm, an output-layer
    # bias, PyTorch-default init.
    "paper_gpt": dict(
        family="gpt",
        lpa_attn_rank=12,
        lpa_ffn_rank=20,
        sublayer_norm="output",
        output_layer_bias=True,
        init_style="pytorch",
    ),
}


def tiny_config(variant: str, tp: int, pp: int, sp: bool) -> LPAConfig:
    spec = dict(VARIANTS[variant])
    family = spec.pop("family")
    if family == "llama":
        arch = dict(
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            position_embedding_type="rope",
            num_query_groups=4,
        )
    else:
        arch = dict(
            normalization="LayerNorm",
            activation_func=F.gelu,
            add_bias_linear=True,
            position_embedding_type="learned_absolute",
        )
    return LPAConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=8,
        ffn_hidden_size=96,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        **arch,
        **spec,
    )


def batches():
    """The same fixed micro-batches on every rank: (tokens, labels, position_ids), [b, s] each."""
    generator = torch.Generator().manual_seed(7)
    data = torch.randint(0, VOCAB, (MICRO_BATCHES, MICRO_BATCH, SEQ + 1), generator=generator)
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    return iter([(d[:, :-1], d[:, 1:], positions) for d in data])


def forward_step(data_iterator, model):
    tokens, labels, positions = next(data_iterator)
    losses = model(tokens, positions, None, labels=labels)  # [b, s]

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return losses, loss_func


def with_grads(sharded_state_dict):
    """The same sharded layout, holding each parameter's (finalised) gradient instead of its
    value."""

    def swap(item):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and isinstance(
            item.data, torch.nn.Parameter
        ):
            item.data = item.data.main_grad.view_as(item.data)
        return item

    return dict_list_map_inplace(swap, sharded_state_dict)


def tensors_only(sharded_state_dict):
    return {k: v for k, v in sharded_state_dict.items() if not k.endswith("_extra_state")}


def run_variant(variant, args):
    config = tiny_config(variant, args.tp, args.pp, args.sp)
    config.finalize_model_grads_func = finalize_model_grads
    set_seed(1234)
    model = build_model(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if args.load_weights:
        state = dist_checkpointing.load(
            tensors_only(model.sharded_state_dict()), str(Path(args.load_weights) / variant)
        )
        model.load_state_dict(state, strict=False)
    if args.load_full:
        full = torch.load(Path(args.load_full) / f"{variant}.pt")
        load_cut_weights(model, full["weights"], config)
    if args.save_weights:
        dist_checkpointing.save(
            tensors_only(model.sharded_state_dict()), _fresh_dir(Path(args.save_weights) / variant)
        )
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches(),
        model=[ddp],
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
    )
    if args.save_grads:
        dist_checkpointing.save(
            with_grads(tensors_only(model.sharded_state_dict())),
            _fresh_dir(Path(args.save_grads) / variant),
        )
    if args.check_grads:
        mine = with_grads(tensors_only(model.sharded_state_dict()))
        reference = dist_checkpointing.load(
            tensors_only(model.sharded_state_dict()), str(Path(args.check_grads) / variant)
        )
        for name, item in mine.items():
            torch.testing.assert_close(
                item.data,
                reference[name],
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, name=name: f"{variant} grad {name}: {m}",
            )
    if args.save_full:
        weights = model.state_dict()
        grads = {name: p.main_grad.view_as(p).clone() for name, p in model.named_parameters()}
        if torch.distributed.get_rank() == 0:
            torch.save({"weights": weights, "grads": grads}, Path(args.save_full) / f"{variant}.pt")
    if args.load_full:
        check_cut_grads(model, full["grads"], config, variant)
    if parallel_state.is_pipeline_last_stage():
        loss = float(sum(step["loss"] for step in losses) / len(losses))
        return {variant: loss}
    return {}


def load_cut_weights(model, full: dict, config) -> None:
    """Loads this TP rank's shards of the TP=1 state dict ``full``, every key, strictly."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    state, extra = tp_shards.rank_state_dict(
        full, model.state_dict(), tp_rank, tp_size, gated=config.gated_linear_unit
    )
    # The only entries not cut are the _extra_state of each linear slot (4 per layer, and the
    # output layer's): layer metadata (None without Transformer Engine), not weights.
    assert all(tp_shards.EXTRA_STATE.search(key) for key in extra), extra
    assert len(extra) == 4 * config.num_layers + 1, extra
    assert all(full[key] is None for key in extra), [key for key in extra if full[key] is not None]
    model.load_state_dict(state, strict=True)


def check_cut_grads(model, full_grads: dict, config, variant: str) -> None:
    """Each parameter's finalised gradient is its shard of the TP=1 gradient."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    assert set(params) == set(full_grads), sorted(set(params) ^ set(full_grads))
    for name, param in params.items():
        expected = tp_shards.cut(
            name, full_grads[name], tp_rank, tp_size, gated=config.gated_linear_unit
        )
        torch.testing.assert_close(
            param.main_grad.view_as(param),
            expected,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, name=name: f"{variant} grad {name} (TP rank {tp_rank}, cut by rule): {m}",
        )


def _fresh_dir(path: Path) -> str:
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=False)
    torch.distributed.barrier()
    return str(path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--load-weights")
    parser.add_argument("--save-weights")
    parser.add_argument("--save-grads")
    parser.add_argument("--check-grads")
    parser.add_argument("--save-full")
    parser.add_argument("--load-full")
    parser.add_argument("--loss-file", required=True)
    parser.add_argument("--check-loss", action="store_true")
    args = parser.parse_args()

    assert not args.load_full or args.pp == 1, "--load-full cuts TP shards only"
    initialize_distributed(args.tp, args.pp)
    if args.save_full and torch.distributed.get_rank() == 0:
        Path(args.save_full).mkdir(parents=True, exist_ok=True)
    losses = {}
    for variant in args.variants.split(","):
        losses.update(run_variant(variant, args))
    is_reporter = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    if is_reporter and args.check_loss:
        expected = json.loads(Path(args.loss_file).read_text())
        for variant, loss in losses.items():
            assert abs(loss - expected[variant]) <= 1e-5 * abs(expected[variant]), (
                f"{variant}: loss {loss} at tp={args.tp} pp={args.pp} sp={args.sp}, "
                f"reference {expected[variant]}"
            )
    elif is_reporter:
        Path(args.loss_file).write_text(json.dumps(losses))
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
