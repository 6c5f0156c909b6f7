"""PyTorch's default initialisation for every tensor of a megatron-core GPT model.

The paper's models are plain ``nn.Module``s, so each tensor starts as PyTorch initialises it:

    embeddings (token, position)      N(0, 1)                         (``nn.Embedding``)
    linear weight [out, in]           U(-1/sqrt(in), 1/sqrt(in))      (``nn.Linear``,
                                                                       kaiming_uniform, a=sqrt(5))
    linear bias                       U(-1/sqrt(in), 1/sqrt(in)), ``in`` of the weight it follows
    norm weight / bias                1 / 0

This holds for dense and low-rank linears alike (an LPA pair is two ``nn.Linear``s there), and for
the output layer. Each tensor is drawn whole, in fp32, from a generator seeded by the run's seed and
the tensor's name with its global layer number; a rank keeps its own shard. So the weights do not
depend on the TP or PP size, the device count or the order modules are built in.
"""

import hashlib
import math

import torch
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

from megatron_lpa.ops.rms_norm import FusedRMSNorm

NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm, FusedRMSNorm)
EMBEDDINGS = (torch.nn.Embedding, VocabParallelEmbedding)


def init_like_pytorch(model: torch.nn.Module, seed: int) -> None:
    """Re-initialises every parameter of ``model`` (one pipeline stage's ``GPTModel``) in place.

    Raises ``TypeError`` for a parameter this function has no rule for, so that no tensor silently
    keeps another init.
    """
    tp_group = get_tensor_model_parallel_group_if_none(None)
    tp_size, tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
    global_name = global_names(model)
    for module_name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        for name, param in params.items():
            full_name = global_name(f"{module_name}.{name}" if module_name else name)
            with torch.no_grad():
                if isinstance(module, NORMS):
                    param.fill_(1.0 if name == "weight" else 0.0)
                    continue
                if isinstance(module, EMBEDDINGS) or _is_tied_output_weight(model, module, name):
                    draw = _normal
                else:
                    draw = _uniform(_fan_in(module, name, params, tp_size))
                param.copy_(_shard(draw, full_name, seed, param, tp_size, tp_rank))


def global_names(model):
    """A function from ``model``'s parameter names to model-wide ones: ``decoder.layers.<local>``
    -> ``decoder.layers.<global>`` (a pipeline stage's first layer is not layer 0); the output
    weight tied to the embedding takes the embedding's name."""
    renames = {}
    decoder = getattr(model, "decoder", None)
    for index, layer in enumerate(getattr(decoder, "layers", [])):
        renames[f"decoder.layers.{index}."] = f"decoder.layers.{layer.layer_number - 1}."
    tied = getattr(model, "share_embeddings_and_output_weights", False)

    def rename(name: str) -> str:
        if tied and name == "output_layer.weight":
            return "embedding.word_embeddings.weight"
        for local, global_ in renames.items():
            if name.startswith(local):
                return global_ + name[len(local) :]
        return name

    return rename


def _is_tied_output_weight(model, module, name: str) -> bool:
    """The last stage's copy of the tied embedding (megatron keeps it equal to the first
    stage's)."""
    return (
        name == "weight"
        and module is getattr(model, "output_layer", None)
        and getattr(model, "share_embeddings_and_output_weights", False)
    )


def _fan_in(module, name: str, params: dict, tp_size: int) -> int:
    """The input width of the full (unsharded) linear that ``name`` belongs to.

    A weight is ``[out, in]``; a bias takes the ``in`` of the weight whose output it is added to,
    which the low-rank layers name in ``bias_weights`` (A's for a column slot, B's for a row slot).
    """
    weight_name = getattr(module, "bias_weights", {"bias": "weight"}).get(name, name)
    weight = params.get(weight_name)
    if weight is None or weight.dim() != 2:
        raise TypeError(f"no PyTorch-default init rule for {type(module).__name__}.{name}")
    split_input = getattr(weight, "tensor_model_parallel", False) and weight.partition_dim == 1
    return weight.shape[1] * (tp_size if split_input else 1)


def _normal(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return tensor.normal_(0.0, 1.0, generator=generator)


def _uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def draw(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return tensor.uniform_(-bound, bound, generator=generator)

    return draw


def _shard(
    draw, full_name: str, seed: int, param: torch.nn.Parameter, tp_size: int, tp_rank: int
) -> torch.Tensor:
    """Draws the full tensor of ``param`` and returns this rank's shard of it.

    A TP-split parameter holds, along ``partition_dim``, chunks ``rank, rank + t, ...`` of the full
    tensor cut into ``t * partition_stride`` pieces (megatron's layout; stride 2 for SwiGLU's
    fused gate/up weight).
    """
    split = getattr(param, "tensor_model_parallel", False) and tp_size > 1
    dim = param.partition_dim if split else 0
    stride = getattr(param, "partition_stride", 1) if split else 1
    full_shape = list(param.shape)
    if split:
        full_shape[dim] *= tp_size
    generator = torch.Generator(device=param.device)
    generator.manual_seed(_tensor_seed(seed, full_name))
    full = draw(torch.empty(full_shape, dtype=torch.float32, device=param.device), generator)
    if not split:
        return full
    pieces = full.chunk(tp_size * stride, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
