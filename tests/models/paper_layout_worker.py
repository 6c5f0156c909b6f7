"""torchrun worker: the paper configs, shrunk, at one TP/SP/PP layout: full weights and logits.

For each ``--config`` it builds our model from the YAML file plus ``--shrink`` flags and the layout
flags (through ``parse_args``, as ``pretrain_gpt.py`` does), runs a forward pass of fixed tokens
through megatron's schedule (pipelined with PP), gathers every parameter to its full, unsharded
tensor under its model-wide name, and rank 0 saves ``{config: {"state": ..., "logits": ...}}``.
"""

import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lpa.config.command_line import parse_args
from megatron_lpa.config.model_config import lpa_config, padded_vocab_size
from megatron_lpa.models.builder import build_model
from megatron_lpa.models.pytorch_init import global_names
from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed, set_seed


def fixed_tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(3))


def our_model(argv: list):
    """(model, TrainingConfig) of ``argv`` at this process's layout, fp32 whatever the file says."""
    cfg = parse_args(argv).replace(bf16=False, fp16=False)
    set_seed(cfg.run.seed)
    model = build_model(
        lpa_config(cfg, padded_vocab_size(cfg.data.vocab_size, cfg)),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    return model, cfg


def full_state(model) -> dict:
    """Every parameter of every rank as the full tensor, keyed by its model-wide name (rank 0)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rename, state = global_names(model), {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(shards, tensor.contiguous(), group=tp_group)
            dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
            pieces = [shard.chunk(stride, dim=dim) for shard in shards]
            tensor = torch.cat([pieces[r][j] for j in range(stride) for r in range(tp)], dim=dim)
        state[rename(name)] = tensor.clone()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return {k: v for part in gathered for k, v in part.items()}


def logits_of(model, cfg) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` of the fixed tokens (every rank gets the last stage's)."""
    tokens = fixed_tokens(cfg.data.vocab_size, cfg.schedule.micro_batch_size, cfg.model.seq_length)
    positions = torch.arange(cfg.model.seq_length).expand_as(tokens)

    def forward_step(iterator, chunk):
        batch = next(iterator)
        output = chunk(batch, positions, None)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor.detach()

        return output, collect

    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.schedule.micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    logits = None
    if parallel_state.is_pipeline_last_stage():
        local = outputs[0]  # [b, s, vocab/t]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(
            shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
        )
        logits = torch.cat(shards, dim=-1)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, logits)
    return next(item for item in gathered if item is not None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--layout",
        nargs=argparse.REMAINDER,
        default=[],
        help="layout flags, then any flags for every config",
    )
    args = parser.parse_args()
    results = {}
    for spec in args.configs:
        path, _, rank = spec.partition(":")
        argv = ["--config", path, *args.layout]
        if rank:
            argv += ["--lpa-attn-rank", rank]
        flags = parse_args(argv)
        initialize_distributed(
            flags.parallel.tensor_model_parallel_size, flags.parallel.pipeline_model_parallel_size
        )
        model, cfg = our_model(argv)
        results[spec] = {"state": full_state(model), "logits": logits_of(model, cfg)}
        destroy_distributed(keep_process_group=True)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
