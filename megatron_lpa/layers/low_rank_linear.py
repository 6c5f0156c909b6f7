"""Low-rank (LPA) drop-ins for megatron-core's column- and row-parallel linear slots.

Each projection ``y = W x`` becomes ``y = B (A x)`` with ``A: in -> r`` and ``B: r -> out`` and
nothing in between (Lv et al., 2024). The two classes keep megatron-core's constructor keywords and
return ``(output, bias)``, so a layer spec swaps them into ``linear_qkv``/``linear_fc1`` (column)
and ``linear_proj``/``linear_fc2`` (row) without touching the model.

Shape legend: ``s`` sequence, ``b`` micro-batch, ``d`` layer input width, ``r`` LPA rank, ``P``
number of projections fused in one column slot (3 for Q/K/V, 2 for SwiGLU gate/up, else 1), ``t``
tensor-parallel size. With sequence parallelism the activations entering a column slot and leaving a
row slot are ``[s/t, b, d]``.

Parallel layouts (per rank; "redundant" = computed identically on every TP rank)::

    slot        factor  dense (megatron)            LPA (this module)
    ---------   ------  --------------------------  -------------------------------------------
    column      A       -                           [P*r, d]   replicated (one GEMM for Q, K, V)
    (qkv, fc1)  B / W   W: [out/t, d] split dim 0    [out_p/t, r] per projection, split dim 0
    row         A / W   W: [d, in/t]  split dim 1    [r, in/t]  split dim 1
    (proj, fc2) B       -                           [out, r]   replicated

    collective per token    dense (no SP / SP)                 LPA (no SP / SP)
    column forward          - / all-gather d                   - / all-gather P*r
    column backward         all-reduce d / reduce-scatter d    all-reduce P*r / reduce-scatter P*r
    row forward             all-reduce d / reduce-scatter d    all-reduce r / reduce-scatter r
    row backward            - / all-gather d                   - / all-gather r

Why these layouts:

* Column slot without SP: A is replicated and applied to the full input, which costs ``2*d*P*r``
  redundant FLOPs per token on every rank but needs no forward collective; its only collective is
  the backward all-reduce of the ``P*r``-wide intermediate gradient (dense all-reduces the
  ``d``-wide input gradient). Splitting A over ranks instead would add a forward all-gather of the
  intermediate *and* still need a ``d``-wide all-reduce of the input gradient, since every rank
  would hold a partial one.
* Column slot with SP: the replicated A is applied to the local sequence shard (no redundant FLOPs),
  then the ``P*r``-wide intermediate is all-gathered along the sequence. A's gradient then differs
  per rank, so A is marked ``sequence_parallel`` and megatron's ``finalize_model_grads`` all-reduces
  it over TP, as it does for norm weights.
* Row slot: A is split along its input like megatron's row-parallel weight, so each rank's partial
  sum is ``r`` wide; the reduction (all-reduce, or reduce-scatter along the sequence with SP) moves
  ``r`` values per token, then the replicated B maps ``r -> out`` locally (on the local sequence
  shard with SP, where B and the bias are marked ``sequence_parallel``).
"""

import math
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import (
    linear_with_grad_accumulation_and_async_allreduce,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import (
    divide,
    get_pg_rank,
    get_pg_size,
    get_tensor_model_parallel_group_if_none,
)
from torch.nn import Parameter

LPA_INIT_METHODS = ("linear", "variance")
"""``linear``: each factor like a PyTorch ``nn.Linear`` (U(+-1/sqrt(fan_in))), as the paper's code
does. ``variance``: both factors N(0, (sigma^2/r)^(1/4)) so that ``B @ A`` has the variance sigma^2
of the dense layer's ``init_method`` (megatron's N(0, sigma) init)."""

PROJECTIONS = ("single", "qkv", "gate_up")
"""What one column slot holds: one projection, megatron's fused Q/K/V, or SwiGLU's gate and up."""


def check_lpa_rank(rank: int, in_features: int, out_features: int, where: str) -> None:
    """Reject ranks that cannot work and warn about ranks that save nothing.

    Args:
        rank: the LPA rank r of one ``B(A x)`` pair.
        in_features, out_features: the width of the dense projection the pair replaces.
        where: the projection's name, for the message (e.g. ``"attention query"``).
    """
    if rank < 1:
        raise ValueError(
            f"LPA rank of the {where} projection is {rank}; it must be >= 1 "
            "(use rank 0 in the config to keep that projection dense)."
        )
    if rank > min(in_features, out_features):
        raise ValueError(
            f"LPA rank {rank} of the {where} projection ({in_features} -> {out_features}) exceeds "
            f"its width {min(in_features, out_features)}; choose a rank <= "
            f"{in_features * out_features // (in_features + out_features)} to save parameters."
        )
    if rank * (in_features + out_features) >= in_features * out_features:
        warnings.warn(
            f"LPA rank {rank} of the {where} projection ({in_features} -> {out_features}) has at "
            f"least as many parameters as the dense layer; ranks below "
            f"{in_features * out_features / (in_features + out_features):.0f} save compute and "
            "memory."
        )


def _init_factor(
    shape: Sequence[int],
    lpa_init: str,
    fan_in: int,
    rank: int,
    init_method: Callable,
    device,
    perform_initialization: bool = True,
) -> torch.Tensor:
    """Initialises one full (unsharded) factor in fp32 from the default generator.

    Every TP rank draws the full factor from the same generator state and keeps its slice, so the
    weights do not depend on the TP size and replicated factors are identical across ranks.
    """
    master = torch.empty(*shape, dtype=torch.float32, device=device)
    if not perform_initialization:
        return master
    if lpa_init == "linear":
        bound = 1.0 / math.sqrt(fan_in)
        torch.nn.init.uniform_(master, -bound, bound)
    elif lpa_init == "variance":
        sigma = getattr(init_method, "keywords", {}).get("std")
        if sigma is None:
            raise ValueError(
                "lpa_init='variance' needs megatron's normal init_method "
                "(init_method_normal / scaled_init_method_normal); use 'linear'."
            )
        torch.nn.init.normal_(master, mean=0.0, std=(sigma * sigma / rank) ** 0.25)
    else:
        raise ValueError(f"lpa_init must be one of {LPA_INIT_METHODS}, got {lpa_init!r}")
    return master


def _reject_unsupported(is_expert, skip_weight_param_allocation, disable_grad_reduce, name):
    if is_expert or skip_weight_param_allocation or disable_grad_reduce:
        raise NotImplementedError(
            f"{name} does not support is_expert, skip_weight_param_allocation or "
            "disable_grad_reduce (MoE experts, externally supplied weights, LoRA-style grad "
            "deferral); keep those slots dense."
        )


class _LowRankBase(torch.nn.Module):
    """What both slots share: parameter creation, megatron's extra-state contract, no delayed
    wgrad."""

    def __init__(self, config: ModelParallelConfig, tp_group, lpa_init: str, lpa_rank: int):
        super().__init__()
        self.config = config
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        self.tp_size = get_pg_size(self.tp_group)
        self.tp_rank = get_pg_rank(self.tp_group)
        self.sequence_parallel = config.sequence_parallel and self.tp_size > 1
        self.lpa_init, self.lpa_rank = lpa_init, lpa_rank
        self._device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        # megatron's linears always carry an (empty) _extra_state entry; keep checkpoints
        # compatible.
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *args, **kwargs: state_dict.setdefault(
                f"{prefix}_extra_state"
            )
        )

    def _factor(self, shape, fan_in: int, init_method: Callable, split_dim: Optional[int]):
        """A factor parameter: this rank's slice (along ``split_dim``, or all) of the full
        factor."""
        master = _init_factor(
            shape,
            self.lpa_init,
            fan_in,
            self.lpa_rank,
            init_method,
            self._device,
            self.config.perform_initialization,
        )
        if split_dim is not None:
            master = master.chunk(self.tp_size, dim=split_dim)[self.tp_rank]
        param = Parameter(master.to(self.config.params_dtype).contiguous())
        set_tensor_model_parallel_attributes(
            param,
            is_parallel=split_dim is not None,
            dim=split_dim if split_dim is not None else -1,
            stride=1,
        )
        setattr(param, "allreduce", True)
        return param

    def _bias(self, size: int, tp_split: bool) -> Parameter:
        bias = Parameter(torch.zeros(size, dtype=self.config.params_dtype, device=self._device))
        set_tensor_model_parallel_attributes(bias, is_parallel=tp_split, dim=0, stride=1)
        setattr(bias, "allreduce", True)
        return bias

    def _linear(
        self, input_: torch.Tensor, weight: Parameter, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``F.linear``; with ``gradient_accumulation_fusion``, megatron's linear function instead,
        whose backward adds the weight gradient straight into ``weight.main_grad`` (fp32) rather
        than writing a bf16 gradient for megatron's DDP to add in a second pass."""
        if not self.config.gradient_accumulation_fusion:
            return F.linear(input_, weight, bias)
        return linear_with_grad_accumulation_and_async_allreduce(
            input_,
            weight,
            bias,
            gradient_accumulation_fusion=True,
            allreduce_dgrad=False,
            sequence_parallel=False,
            tp_group=self.tp_group,
        )

    def backward_dw(self) -> None:
        """Delayed weight-gradient computation is not used: gradients come from autograd."""

    def set_extra_state(self, state: Any) -> None:
        """Extra state is ignored (megatron linear-layer contract)."""

    def get_extra_state(self) -> None:
        """Keeps checkpoints compatible with megatron's and TE's linear layers."""
        return None

    def _sharded_state_dict(self, axis_map, prefix, sharded_offsets, metadata):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            axis_map,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )


class LowRankColumnParallelLinear(_LowRankBase):
    """Column slot: ``P`` low-rank projections sharing one fused down-projection.

    ``forward(x)``: ``x`` is ``[s, b, d]`` (``[s/t, b, d]`` with SP); returns ``([s, b, out/t],
    None)`` in megatron's per-rank layout: for ``qkv``, per local query group ``[q heads, k, v]``;
    for ``gate_up``, ``[gate, up]``. Parameters: ``down_weight [P*r, d]`` and, with ``bias``,
    ``down_bias [P*r]`` (both replicated), ``up_weight_<p> [out_p/t, r]`` per projection ``p``
    (split dim 0).

    The bias sits on A's r-wide output, as in the paper's code (``Linear(d, r)`` with a bias, then
    ``Linear(r, out, bias=False)``): ``y = B (A x + c)``. So it is always added here and never
    handed back for the caller to add (``skip_bias_add`` has nothing to skip).

    Args (beyond megatron's ``ColumnParallelLinear`` keywords, given through the spec's params):
        lpa_rank: r, the rank of every projection in the slot.
        projections: one of ``PROJECTIONS``.
        lpa_init: one of ``LPA_INIT_METHODS``.
        split_output: return the projections as a list ``[s, b, out_p/t]`` each
            instead of interleaving them; ``LowRankSelfAttention`` takes Q, K and V this way.
    """

    bias_weights = {"down_bias": "down_weight"}
    """The factor whose output each bias is added to (``models/pytorch_init.py`` reads its
    fan-in)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable,
        lpa_rank: int,
        projections: str = "single",
        lpa_init: str = "linear",
        split_output: bool = False,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        embedding_activation_buffer=None,
        grad_output_buffer=None,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        disable_grad_reduce: bool = False,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__(config, tp_group, lpa_init, lpa_rank)
        _reject_unsupported(
            is_expert, skip_weight_param_allocation, disable_grad_reduce, type(self).__name__
        )
        self.input_size, self.output_size = input_size, output_size
        self.gather_output = gather_output
        if split_output and gather_output:
            raise ValueError("split_output returns each projection on this rank; it cannot gather.")
        self.split_output = split_output
        self.part_names, part_sizes, num_blocks = self._parts(projections, output_size, config)
        # The per-rank output interleaves the projections in `blocks_per_partition` blocks
        # (the local query groups for qkv), exactly as megatron's fused weights lay them out.
        self.blocks_per_partition = divide(num_blocks, self.tp_size) if num_blocks > 1 else 1
        self.part_sizes_per_partition = [divide(size, self.tp_size) for size in part_sizes]
        self.output_size_per_partition = divide(output_size, self.tp_size)
        for name, size in zip(self.part_names, part_sizes):
            check_lpa_rank(lpa_rank, input_size, size, f"{tp_comm_buffer_name or 'column'} {name}")

        num_parts = len(part_sizes)
        self.down_weight = self._factor(
            (num_parts * lpa_rank, input_size), input_size, init_method, split_dim=None
        )
        # With SP each rank sees its own sequence shard, so A's gradient must be summed over TP.
        setattr(self.down_weight, "sequence_parallel", self.sequence_parallel)
        for name, size in zip(self.part_names, part_sizes):
            self.register_parameter(
                self._up_name(name), self._factor((size, lpa_rank), lpa_rank, init_method, 0)
            )
        if bias:
            self.down_bias = self._bias(num_parts * lpa_rank, tp_split=False)
            setattr(self.down_bias, "sequence_parallel", self.sequence_parallel)
        else:
            self.register_parameter("down_bias", None)

    @staticmethod
    def _parts(projections: str, output_size: int, config) -> Tuple[Tuple[str, ...], list, int]:
        """Names, global output sizes and interleave block count of the slot's projections."""
        if projections == "qkv":
            heads = config.num_attention_heads
            groups = config.num_query_groups or heads
            q_size, kv_size = heads * config.kv_channels, groups * config.kv_channels
            if output_size != q_size + 2 * kv_size:
                raise ValueError(
                    f"qkv slot of width {output_size} does not match {heads} heads, "
                    f"{groups} query groups of {config.kv_channels} channels."
                )
            return ("q", "k", "v"), [q_size, kv_size, kv_size], groups
        if projections == "gate_up":
            return ("gate", "up"), [output_size // 2, output_size // 2], 1
        if projections == "single":
            return ("",), [output_size], 1
        raise ValueError(f"projections must be one of {PROJECTIONS}, got {projections!r}")

    @staticmethod
    def _up_name(part: str) -> str:
        return f"up_weight_{part}" if part else "up_weight"

    def up_weights(self) -> list:
        """This rank's up-projections ``[out_p/t, r]``, in the order of ``part_names``."""
        return [getattr(self, self._up_name(name)) for name in self.part_names]

    def _interleave(self, parts: list) -> torch.Tensor:
        """``[..., out_p/t]`` per projection -> ``[..., out/t]`` in megatron's fused layout."""
        if len(parts) == 1:
            return parts[0]
        lead = parts[0].shape[:-1]
        blocks = [p.reshape(*lead, self.blocks_per_partition, -1) for p in parts]
        return torch.cat(blocks, dim=-1).reshape(*lead, self.output_size_per_partition)

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if weight is not None:
            raise NotImplementedError(
                "LowRankColumnParallelLinear owns its factors; pass no weight."
            )
        # [s(/t), b, d] -> [s(/t), b, P*r]: one GEMM reads the input once for all projections.
        low = self._linear(input_, self.down_weight, self.down_bias)
        if self.sequence_parallel:
            # [s/t, b, P*r] -> [s, b, P*r]; backward reduce-scatters the r-wide gradient.
            low = gather_from_sequence_parallel_region(
                low, tensor_parallel_output_grad=True, group=self.tp_group
            )
        elif self.tp_size > 1:
            # Identity forward; backward all-reduces the r-wide gradient of the partial head sums.
            low = copy_to_tensor_model_parallel_region(low, group=self.tp_group)
        # [s, b, P*r] -> P x [s, b, out_p/t]
        outputs = [
            self._linear(h, w) for h, w in zip(low.split(self.lpa_rank, dim=-1), self.up_weights())
        ]
        if self.split_output:
            return outputs, None
        output = self._interleave(outputs)  # -> [s, b, out/t]
        if runtime_gather_output if runtime_gather_output is not None else self.gather_output:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """A and its bias replicated; each B sharded along axis 0 (resharding across TP/PP)."""
        axis_map = {self._up_name(name): 0 for name in self.part_names}
        return self._sharded_state_dict(axis_map, prefix, sharded_offsets, metadata)

    def __repr__(self):
        return (
            f"{type(self).__name__}(in_features={self.input_size}, "
            f"out_features={self.output_size}, rank={self.lpa_rank}, "
            f"projections={self.part_names}, bias={self.down_bias is not None}, "
            f"TP={self.tp_size})"
        )


class LowRankRowParallelLinear(_LowRankBase):
    """Row slot: ``y = B (A x)`` with A split along its input and the reduction on the r-wide
    partial sums.

    ``forward(x)``: ``x`` is ``[s, b, in/t]`` (the local heads or FFN shard); returns
    ``([s, b, out], bias)`` (``[s/t, b, out]`` with SP). Parameters: ``down_weight [r, in/t]``
    (split dim 1), ``up_weight [out, r]`` and ``bias [out]`` (replicated).
    """

    bias_weights = {"bias": "up_weight"}
    """The factor whose output each bias is added to (``models/pytorch_init.py`` reads its
    fan-in)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable,
        lpa_rank: int,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        lpa_init: str = "linear",
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: Optional[str] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__(config, tp_group, lpa_init, lpa_rank)
        _reject_unsupported(is_expert, False, False, type(self).__name__)
        if not input_is_parallel:
            raise NotImplementedError(
                "LowRankRowParallelLinear needs input_is_parallel=True "
                "(megatron's attention and MLP always pass it)."
            )
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add = skip_bias_add
        self.input_size_per_partition = divide(input_size, self.tp_size)
        check_lpa_rank(lpa_rank, input_size, output_size, tp_comm_buffer_name or "row")

        self.down_weight = self._factor((lpa_rank, input_size), input_size, init_method, 1)
        self.up_weight = self._factor((output_size, lpa_rank), lpa_rank, init_method, None)
        # With SP, B runs on each rank's sequence shard: its gradient must be summed over TP.
        setattr(self.up_weight, "sequence_parallel", self.sequence_parallel)
        if bias:
            self.bias = self._bias(output_size, tp_split=False)
            setattr(self.bias, "sequence_parallel", self.sequence_parallel)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # [s, b, in/t] -> [s, b, r], a partial sum over this rank's input shard.
        low = self._linear(input_, self.down_weight)
        if self.sequence_parallel:
            low = reduce_scatter_to_sequence_parallel_region(
                low, group=self.tp_group
            )  # [s/t, b, r]
        elif self.tp_size > 1:
            low = reduce_from_tensor_model_parallel_region(low, group=self.tp_group)  # [s, b, r]
        add_bias = self.bias is not None and not self.skip_bias_add
        output = self._linear(
            low, self.up_weight, self.bias if add_bias else None
        )  # [s(/t), b, out]
        return output, self.bias if self.skip_bias_add else None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """A sharded along axis 1; B and the bias replicated (resharding across TP/PP)."""
        return self._sharded_state_dict({"down_weight": 1}, prefix, sharded_offsets, metadata)

    def __repr__(self):
        return (
            f"{type(self).__name__}(in_features={self.input_size}, "
            f"out_features={self.output_size}, rank={self.lpa_rank}, "
            f"bias={self.bias is not None}, TP={self.tp_size})"
        )
