"""Optimizer state in a checkpoint, and megatron-core 0.16.1's defects on its load path.

The non-distributed optimizer's state is sharded like the parameters. The distributed optimizer is
saved as ``fully_reshardable``, gathered into parameter-shaped tensors, so both reshard over TP,
PP and DP. (megatron-core's default, ``fully_sharded_model_space``, fails to save:
"ShardedTensor.flattened_range is not supported"; ``dp_reshardable`` reshards over DP only.) The
gather goes over gloo to DP rank 0 (``distrib_optim_fully_reshardable_mem_efficient``): the other
mode all-gathers the whole optimizer state into host memory on every rank (40 GB per rank for a
3B model) and, on CPU, fails on its ``.cuda()`` calls. It needs the optimizer's gloo DP group
(``get_megatron_optimizer(..., use_gloo_process_groups=True)``, the default).

megatron-core 0.16.1 cannot load the distributed optimizer with torch's Adam (no TE/apex); the
workarounds are ``allocate_distributed_optimizer_state`` (no state before the first step) and
``load_distributed_optimizer`` (KeyError on ``step``). After any load, every parameter gets its own
Adam ``step`` tensor back (``give_each_param_its_own_step``): megatron-core hands all of them one
shared tensor, which torch's Adam increments once per parameter per step, so bias correction is
wrong from the first step after a resume.
"""

from pathlib import Path
from typing import Optional

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_lpa.checkpointing.files import CheckpointError

SHARDING_TYPE = "fully_reshardable"
SHARDING_METADATA = {
    "distrib_optim_sharding_type": SHARDING_TYPE,
    "distrib_optim_fully_reshardable_mem_efficient": True,
}
NO_LOAD_OPTIM = "load with load_optim=False (--no-load-optim) to start a fresh optimizer"


def sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_format(optimizer) -> Optional[str]:
    if optimizer is None:
        return None
    distributed = any(isinstance(o, DistributedOptimizer) for o in sub_optimizers(optimizer))
    return f"distributed:{SHARDING_TYPE}" if distributed else "local"


def check_optimizer_format(saved: Optional[str], current: str, path: Path) -> None:
    if saved is None:
        raise CheckpointError(f"{path} holds no optimizer state; {NO_LOAD_OPTIM}.")
    if saved != current:
        raise CheckpointError(
            f"{path} holds {saved!r} optimizer state but this run's optimizer is {current!r} "
            f"(--use-distributed-optimizer changed); {NO_LOAD_OPTIM}, or keep the saved setting."
        )


def sub_states(optimizer, state) -> list:
    # A chain of one has its member's state; longer chains key their members' states by position.
    return [state] if len(sub_optimizers(optimizer)) == 1 else [state[i] for i in sorted(state)]


def drop_empty_param_states(optimizer, state) -> None:
    """Removes the ``param_state: None`` of DP ranks > 0 of a distributed optimizer.

    Its state is gathered to DP rank 0 for saving; the None left on the other ranks makes
    dist_checkpointing warn on every save that their common state differs from rank 0's.
    """
    for sub_state in sub_states(optimizer, state):
        if "param_state" in sub_state and sub_state["param_state"] is None:
            del sub_state["param_state"]


def allocate_distributed_optimizer_state(optimizer) -> None:
    """Gives a fresh distributed optimizer's torch Adam the state megatron-core expects to exist.

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` reads the per-parameter ``step``
    of torch's Adam (asserting there is exactly one value), which does not exist before the first
    step. The values are placeholders; the load overwrites them.
    """
    for sub in sub_optimizers(optimizer):
        if not isinstance(sub, DistributedOptimizer) or not isinstance(
            sub.optimizer, torch.optim.Adam
        ):
            continue
        for group in sub.optimizer.param_groups:
            for param in group["params"]:
                if not sub.optimizer.state[param]:
                    sub.optimizer.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }


def load_optimizer(optimizer, state) -> None:
    for sub, sub_state in zip(sub_optimizers(optimizer), sub_states(optimizer, state)):
        if isinstance(sub, DistributedOptimizer):
            load_distributed_optimizer(sub, sub_state)
        else:
            sub.load_state_dict(sub_state)
        give_each_param_its_own_step(sub.optimizer)


def load_distributed_optimizer(sub: DistributedOptimizer, state: dict) -> None:
    """``DistributedOptimizer.load_state_dict`` without its crash on torch Adam's ``step``.

    megatron-core copies every key of a parameter's torch state from the loaded parameter state,
    which never holds ``step`` (that comes from the param groups): KeyError. So load the groups and
    step first, then the parameter state with ``step`` set aside.
    """
    param_state = state.pop("param_state")
    sharding_type = state.pop("param_state_sharding_type")
    if sharding_type != SHARDING_TYPE:
        raise CheckpointError(
            f"distributed optimizer state saved as {sharding_type!r}; only {SHARDING_TYPE!r} is "
            f"supported: {NO_LOAD_OPTIM}."
        )
    sub.load_state_dict(state)
    inner_state = sub.optimizer.state
    steps = {param: s.pop("step") for param, s in inner_state.items() if "step" in s}
    sub.load_parameter_state_from_fully_reshardable(param_state)
    for param, step in steps.items():
        inner_state[param]["step"] = step


def give_each_param_its_own_step(torch_optimizer: torch.optim.Optimizer) -> None:
    """Gives every parameter a private Adam ``step`` tensor.

    megatron-core loads one step tensor into all parameters' state (torch keeps the object it is
    given); torch's Adam increments it in place once per parameter, so after a resume the step
    runs ahead by the number of parameters per iteration and bias correction is wrong.
    """
    for param_state in torch_optimizer.state.values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].clone()
