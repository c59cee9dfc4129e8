"""The FIP step guard: no silent plain fine-tuning of a model with remembered anchors.

Two checks, both refusing before anything moves: a training forward pass of a `FIPModel` with remembered anchors and
no FIP optimizer (`check_fip_step`, a forward pre-hook on the base model), and a step of any optimizer that is not a
FIP optimizer but would move such a model's parameters (`_guard_optimizer_step`, a global optimizer step pre-hook).
They read the tuner passed in and never import `fip_peft.method.model`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

if TYPE_CHECKING:
    from .model import FIPModel

# Every live FIPModel, for the optimizer step guard below.
GUARDED_MODELS: weakref.WeakSet = weakref.WeakSet()


def _guard_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A global optimizer step pre-hook (`torch.optim.optimizer.register_optimizer_step_pre_hook`): torch calls it
    before the `step()` of every optimizer, whatever its class and whoever built it (a `Trainer`'s own AdamW, a
    hand-written loop's), in train or eval mode. A step of an optimizer that is not a FIP optimizer and would move a
    parameter (one with a gradient) of a FIP model whose active adapter has remembered anchors is refused with a
    `RuntimeError` before anything moves: it would be plain fine-tuning. FIP optimizers (`_fip_model` set) pass; so
    do all steps while no FIP model has anchors. Cost: one pass over the model's parameter list per step of a
    non-FIP optimizer, only while some FIP model is alive."""
    inner = optimizer
    while inner is not None and getattr(inner, "_fip_model", None) is None:
        inner = getattr(inner, "optimizer", None)  # a wrapper (accelerate's AcceleratedOptimizer) of a FIP optimizer
    if inner is not None:
        return
    models = [model for model in list(GUARDED_MODELS) if remembering_adapters(model)]
    if not models:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    for model in models:
        refuse_plain_step(model, optimizer, stepped)


register_optimizer_step_pre_hook(_guard_optimizer_step)


def install_guard(tuner: FIPModel) -> torch.utils.hooks.RemovableHandle:
    """Guard `tuner` against plain fine-tuning (both checks above); returns the forward hook's handle."""
    owner_ref = weakref.ref(tuner)

    def guard(module, args, kwargs):
        if (owner := owner_ref()) is not None:
            check_fip_step(owner)

    GUARDED_MODELS.add(tuner)
    return tuner.model.register_forward_pre_hook(guard, with_kwargs=True)


def remembering_adapters(tuner: FIPModel) -> list[str]:
    """The active adapters of `tuner` that have remembered anchors."""
    return [n for n in tuner.active_adapters if n in tuner.fip_memory and len(tuner.fip_memory[n])]


def check_fip_step(tuner: FIPModel) -> None:
    """Refuse a training forward pass with anchors but no FIP optimizer: it would be plain fine-tuning."""
    if not (tuner.model.training and torch.is_grad_enabled()) or len(tuner._fip_optimizers):
        return
    if remembering_adapters(tuner) and any(p.requires_grad for p in tuner.parameters()):
        raise RuntimeError(
            "This FIP model has remembered anchors but is being trained without the FIP step, which would "
            "silently fall back to plain fine-tuning. Use `fip_peft.FIPTrainer` instead of `Trainer`, or pass "
            "`optimizers=(fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=...), None)` to `Trainer`, "
            "or build your loop's optimizer with `fip_peft.create_fip_optimizer`."
        )


def refuse_plain_step(tuner: FIPModel, optimizer: torch.optim.Optimizer, stepped: set[int]) -> None:
    """Refuse a step of `optimizer` (not a FIP optimizer) that would move a parameter of `tuner`'s model (ids in
    `stepped`: those with a gradient) while an active adapter has remembered anchors."""
    remembering = remembering_adapters(tuner)
    if not remembering:
        return
    moved = [name for name, p in tuner.model.named_parameters() if id(p) in stepped]
    if not moved:
        return
    raise RuntimeError(
        f"A {type(optimizer).__name__} that is not a FIP optimizer is about to step {len(moved)} parameters of a "
        f"model whose FIP adapter {remembering[0]!r} has remembered anchors (e.g. {moved[0]}): that step would be "
        "plain fine-tuning, which forgets what was remembered; nothing was changed. Use `fip_peft.FIPTrainer` "
        "instead of `Trainer`, or pass `optimizers=(fip_peft.create_fip_optimizer(model, torch.optim.AdamW, "
        "lr=...), None)` to `Trainer` (a FIP optimizer that is created but not passed is not used), or build "
        "your loop's optimizer with `fip_peft.create_fip_optimizer`."
    )
