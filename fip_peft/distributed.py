"""Which multi-process engines the FIP step supports, where its anchor pass runs, and the refusal of the others
before any step is taken.

DDP: the FIP step draws the same anchor batch on every process (its indices depend only on `anchor_seed` and the
step counter, and the anchor memory is a set of buffers that DDP keeps equal to rank 0's) and runs the anchor pass
on the unwrapped model after the task gradient has been averaged: every process adds the same grad D / beta to the
same averaged task gradient, so all apply the same update with no extra communication.

FSDP2 (`fully_shard`): the modules hold only their shard of each parameter outside the root's forward, so the
anchor pass runs through the `fully_shard`-ed root given to the FIP optimizer; its backward reduce-scatters grad D
into the sharded gradients like the task gradient (the same D on every process, so the mean is that D).

DeepSpeed ZeRO keeps the gradients in its own partitioned buffers (`.grad` stays empty) and its engine owns the
step, so the anchor gradient would be dropped; FSDP1 flattens the parameters. Both are refused, as is Accelerate's
FSDP plugin (untested), with an error instead of training without the anchor term.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

UNSUPPORTED = {
    "FSDP": "FSDP1 (and Accelerate's / Trainer's FSDP plugin, untested) would run the FIP anchor pass on sharded "
    "parameters; FSDP2 is supported as `torch.distributed.fsdp.fully_shard` with the FIP optimizer created after "
    "sharding",
    "DEEPSPEED": "DeepSpeed ZeRO keeps gradients in its own partitions (`.grad` stays empty) and owns the optimizer "
    "step, so the FIP anchor gradient would be dropped",
    "MEGATRON_LM": "Megatron-LM splits the model across processes, and the FIP anchor pass runs on the whole model",
}


def check_supported_engine(distributed_type: object) -> None:
    """Refuse an Accelerate `DistributedType` under which the FIP step would be wrong (FSDP, DeepSpeed, Megatron)."""
    name = getattr(distributed_type, "value", distributed_type)
    if name in UNSUPPORTED:
        raise NotImplementedError(
            f"FIP training does not support {name}: {UNSUPPORTED[name]}. Use DDP instead (an Accelerate config "
            "with `distributed_type: MULTI_GPU`, `torchrun`, or Trainer without `fsdp`/`deepspeed`); see "
            "docs/distributed.md."
        )


def anchor_forward(fip_model: nn.Module, root: nn.Module | None, optimized: list[torch.Tensor]) -> nn.Module | None:
    """The module the anchor pass must run through: `root` (the model given to the FIP optimizer) when its
    parameters are FSDP2 `DTensor` shards, since only the `fully_shard`-ed root's forward gathers them; None (the
    base model) otherwise. Refuses FSDP1 and DeepSpeed ZeRO-3 parameters, FSDP2 with a natural solver or with an
    optimizer over the parameters from before sharding (`optimized`), and an Accelerate state set up for an engine
    that `check_supported_engine` refuses."""
    sharded = False
    for parameter in fip_model.parameters():
        if hasattr(parameter, "ds_id"):
            check_supported_engine("DEEPSPEED")
        if type(parameter).__name__ == "FlatParameter":
            check_supported_engine("FSDP")
        sharded = sharded or isinstance(parameter, DTensor)
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        AcceleratorState = None
    if AcceleratorState is not None and AcceleratorState._shared_state:
        check_supported_engine(AcceleratorState().distributed_type)
    if not sharded:
        return None
    solvers = {config.solver for config in fip_model.peft_config.values()}
    if not all(isinstance(parameter, DTensor) for parameter in optimized):
        raise NotImplementedError(
            "The FIP optimizer was created before `fully_shard`, so it holds the parameters from before sharding: "
            "create it after sharding, `create_fip_optimizer(sharded_model, ...)`."
        )
    criteria = {config.sparsity_criterion for config in fip_model.peft_config.values()} - {"magnitude"}
    if criteria:
        raise NotImplementedError(
            f"FIPConfig.sparsity_criterion={sorted(criteria)[0]!r} is not supported on FSDP2 (`fully_shard`) "
            "parameters: its metric is gathered through hooks on unsharded layers. Use "
            "sparsity_criterion='magnitude', or DDP."
        )
    if root is None or root is fip_model or solvers != {"penalty"}:
        raise NotImplementedError(
            "FIP on FSDP2 (`fully_shard`) parameters needs the penalty solver and the FIP optimizer created on the "
            "`fully_shard`-ed model after sharding: `create_fip_optimizer(sharded_model, ...)`; got solvers "
            f"{sorted(solvers)}. See docs/distributed.md."
        )
    return root


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor` (its shard when it is a `DTensor`)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_processes(flag: torch.Tensor) -> torch.Tensor:
    """A boolean tensor that is True only where `flag` is True on every process."""
    value = flag.to(torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return value.bool()
