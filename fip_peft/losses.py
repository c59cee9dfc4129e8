"""The new task's loss in class-incremental learning: leave out the old classes the batch does not hold.

With one head over all classes, the cross-entropy of a batch of new classes pushes every other logit down, the
remembered classes' included: on old inputs their logits sink below the new classes', although nothing about the
old inputs was learned. ER-ACE (Caccia et al. 2022, "New insights on reducing abrupt representation change in
online continual learning") computes the new batch's cross-entropy over the classes present in it and the classes
not seen yet, leaving the old ones to the memory's loss. Here the old classes are those of the labelled anchors, so
the mask needs no bookkeeping: `model.remember(data, labels=...)` is what marks a class as old.
"""

from __future__ import annotations

import torch
from torch import nn


def remembered_classes(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """The sorted class indices among the labels of the remembered anchors (empty without labelled anchors)."""
    from .optimizers.fip import find_fip_model

    labels = find_fip_model(model).memory(adapter_name).labels
    return torch.unique(labels[labels != -100])


def mask_absent_old_classes(
    model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, adapter_name: str | None = None
) -> torch.Tensor:
    """`logits` (N, C) with the remembered classes that `labels` (N,) does not hold set to the dtype's lowest value,
    so that a cross-entropy on them neither pushes those classes down nor learns from them (ER-ACE's asymmetric
    loss). Use it on the new task's batch only, never on the anchors; unchanged before any labelled anchor."""
    if logits.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"`mask_absent_old_classes` takes per-example logits (N, C) and labels (N,), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}."
        )
    old = remembered_classes(model, adapter_name).to(logits.device)
    absent = old[~torch.isin(old, labels.to(logits.device)) & (old < logits.shape[-1])]
    if absent.numel() == 0:
        return logits
    return logits.index_fill(-1, absent, torch.finfo(logits.dtype).min)
