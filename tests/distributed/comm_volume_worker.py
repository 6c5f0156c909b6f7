"""torchrun worker: counts the elements crossing TP collectives in one attention block.

Builds only the self-attention module of the layer spec (linear_qkv, core attention, linear_proj) at
TP=2 and runs forward + backward, counting per collective call the size of the full tensor it moves
(all-reduce: the tensor; all-gather: the gathered output; reduce-scatter: the input). Prints one
JSON line per (variant, d, r, sp) for ``test_comm_volume.py``.
"""

import json
import os

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import layers, mappings
from megatron.core.transformer.spec_utils import build_module

from megatron_lpa.models.layer_spec import get_lpa_layer_spec
from megatron_lpa.models.lpa_config import LPAConfig
from megatron_lpa.platform.distributed import destroy_distributed, initialize_distributed, set_seed

SEQ, BATCH, TP = 8, 2, 2
counted = {"elements": 0}


def _counting(collective, tensor_of):
    def wrapper(*args, **kwargs):
        counted["elements"] += tensor_of(*args, **kwargs).numel()
        return collective(*args, **kwargs)

    return wrapper


def count_block(hidden: int, rank: int, sp: bool) -> int:
    config = LPAConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=4,
        ffn_hidden_size=hidden,
        lpa_attn_rank=rank,
        tensor_model_parallel_size=TP,
        sequence_parallel=sp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        vocab_size=64,
        max_sequence_length=SEQ,
    )
    set_seed(0)
    attention = build_module(
        get_lpa_layer_spec(config).submodules.self_attention, config=config, layer_number=1
    )
    local_seq = SEQ // TP if sp else SEQ
    x = torch.randn(local_seq, BATCH, hidden, requires_grad=True)
    counted["elements"] = 0
    output, bias = attention(x, attention_mask=None)
    output.sum().backward()
    return counted["elements"]


def main():
    initialize_distributed(tensor_model_parallel_size=TP)
    dist.all_reduce = _counting(dist.all_reduce, lambda t, *a, **k: t)
    # megatron-core binds its all-gather / reduce-scatter functions at import time.
    for module in (mappings, layers):
        module.dist_all_gather_func = _counting(
            module.dist_all_gather_func, lambda out, inp, *a, **k: out
        )
        module.dist_reduce_scatter_func = _counting(
            module.dist_reduce_scatter_func, lambda out, inp, *a, **k: inp
        )
    for sp in (False, True):
        for hidden in (64, 128):
            for rank in (0, 4, 8):
                elements = count_block(hidden, rank, sp)
                if dist.get_rank() == 0:
                    print(
                        "VOLUME",
                        json.dumps(
                            dict(d=hidden, r=rank, sp=sp, elements=elements, tokens=SEQ * BATCH)
                        ),
                        flush=True,
                    )
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
