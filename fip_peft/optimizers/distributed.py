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
import torch.distributed as dist
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
    sparsify = [config for config in fip_model.peft_config.values() if config.objective == "sparsify"]
    criteria = {config.sparsity_criterion for config in sparsify} - {"magnitude"}
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


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """An exact, order-sensitive checksum of `tensors` (float bits read as integers, so no rounding can differ
    between processes); int64 arithmetic wraps the same way everywhere."""
    total = torch.zeros((), dtype=torch.long)
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        if flat.is_floating_point():
            flat = flat.contiguous().view(_BITS[flat.element_size()])
        flat = flat.long()
        positions = torch.arange(1, flat.numel() + 1, device=flat.device)
        total = total + (flat * positions).sum().cpu()
    return total


def check_same_anchors(fip_model: nn.Module) -> None:
    """In a multi-process run (a default process group with 2 or more processes; every process must call this at
    the same time): refuse, with a `ValueError` on every process, anchor memories that differ between processes
    (anchor counts, or the anchors themselves). The FIP step draws the same anchor batch on every process, so they
    must all hold the same anchors; remembering each process's shard of the data is the usual mistake. Without this,
    DDP's broadcast of buffers of different sizes aborts deep inside gloo ("Received data size doesn't match") or
    hangs under NCCL, and same-sized shards would silently train on rank 0's anchors only. One `all_gather` of
    2 integers per adapter."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    names = sorted(fip_model.fip_memory)
    values = []
    for name in names:
        memory = fip_model.fip_memory[name]
        values += [len(memory), int(_fingerprint([*memory.inputs.values(), memory.task_ids]))]
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    local = torch.tensor(values, dtype=torch.long, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    rows = [row.tolist() for row in gathered]
    if all(row == rows[0] for row in rows):
        return
    counts = {name: [row[2 * i] for row in rows] for i, name in enumerate(names)}
    same_counts = all(len(set(per_rank)) == 1 for per_rank in counts.values())
    what = "the same counts but different anchors" if same_counts else "different anchor counts"
    raise ValueError(
        f"The FIP anchor memories differ across the {len(rows)} processes ({what}; anchors per adapter and rank: "
        f"{counts}). The FIP step draws the same anchor batch on every process, so every process must remember the "
        "same anchors: call `model.remember(data)` with the same, full data on every process (not each process's "
        "shard of it, e.g. before the dataset is split across processes), or load the adapter with its saved "
        "anchors."
    )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor` (its shard when it is a `DTensor`)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_processes(flag: torch.Tensor) -> torch.Tensor:
    """A boolean tensor that is True only where `flag` is True on every process."""
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()
