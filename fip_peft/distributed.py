"""Which multi-process engines the FIP step supports, and the refusal of the others before any step is taken.

The FIP step draws the same anchor batch on every process (its indices depend only on `anchor_seed` and the step
counter, and the anchor memory is a set of buffers that DDP keeps equal to rank 0's) and runs the anchor pass on
the unwrapped model after the task gradient has been averaged: every process adds the same grad D / beta to the
same averaged task gradient, so all apply the same update with no extra communication.

That needs each process to hold the full trainable parameters and their `.grad`, which is what DDP (Accelerate's
MULTI_GPU / MULTI_CPU, `torchrun`, `Trainer`) gives. FSDP shards the parameters, so the anchor pass would have to
run through the FSDP-wrapped model; DeepSpeed ZeRO keeps the gradients in its own partitioned buffers (`.grad`
stays empty) and its engine owns the step, so the anchor gradient would be dropped. Both are refused here with an
error instead of training without the anchor term.
"""

from __future__ import annotations

from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

UNSUPPORTED = {
    "FSDP": "FSDP shards the parameters, and the FIP anchor pass runs on the unsharded model",
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


def check_parameters_are_whole(model: nn.Module) -> None:
    """Refuse parameters that FSDP or DeepSpeed ZeRO-3 sharded, and an Accelerate state set up for an engine that
    `check_supported_engine` refuses (for loops where the optimizer was created before `accelerator.prepare`)."""
    for parameter in model.parameters():
        if hasattr(parameter, "ds_id"):
            check_supported_engine("DEEPSPEED")
        if isinstance(parameter, DTensor) or type(parameter).__name__ == "FlatParameter":
            check_supported_engine("FSDP")
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    if AcceleratorState._shared_state:
        check_supported_engine(AcceleratorState().distributed_type)
