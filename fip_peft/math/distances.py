"""Output distances d(f(x; w), f(x; w_ref)) on anchors: the math of the functional distance D.

Each function maps outputs and reference outputs of shape (N, ..., C) to per-position distances of shape (N, ...);
`functional_distance` averages them over anchors (and over valid tokens when a mask is given). `anchor_label_loss` is
the label term that joins D when anchors carry labels: the cross-entropy of their logits (DER++'s second term).
Their second-order terms define the metric g = E[J^T M J]: M = I for `logits`, the output Fisher
(diag p - p p^T) / 8 for `bhattacharyya` and (diag p - p p^T) / 2 for `kl`.

Compact references (`FIPConfig.reference_mode="top_k"`): a `TopKReference` keeps, per position, the log-probabilities
of the reference's k most likely classes and of all the other classes merged into one, "the rest". The softmax
distances are then taken on these k + 1 classes, the current model's probabilities gathered on the same k indices
plus its own mass on the rest. Merging classes is a coarse-graining, so the k + 1 class KL and Bhattacharyya
distances are at most the full ones, and equal them when the reference puts (almost) no mass outside its top k (the
peaked next-token distributions of a trained language model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def logits_distance(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance over the last dimension (logits or hidden features): metric g = J^T J."""
    return (outputs.float() - reference.float()).pow(2).sum(dim=-1)


def bhattacharyya_distance(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """-log sum_c sqrt(p_c q_c) between the softmax of `outputs` and of `reference` (the authors' choice)."""
    log_p = F.log_softmax(outputs.float(), dim=-1)
    log_q = F.log_softmax(reference.float(), dim=-1)
    return -torch.logsumexp(0.5 * (log_p + log_q), dim=-1)


def kl_distance(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p): how much the softmax of `outputs` lost of the reference distribution."""
    log_p = F.log_softmax(outputs.float(), dim=-1)
    log_q = F.log_softmax(reference.float(), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


class TopKReference(NamedTuple):
    """A compact reference: `logprobs` (..., k + 1), the reference's log-probabilities of its top-k classes then of
    the rest of the classes; `index` (..., k), those classes' indices (int32 in the memory, to halve its size)."""

    logprobs: torch.Tensor
    index: torch.Tensor

    def rows(self, index: torch.Tensor) -> TopKReference:
        return TopKReference(self.logprobs[index], self.index[index])

    def to(self, device: torch.device | str) -> TopKReference:
        return TopKReference(self.logprobs.to(device), self.index.to(device))


def top_k_reference(outputs: torch.Tensor, k: int) -> TopKReference:
    """Compress reference logits (..., C) to their top-k log-probabilities, the log-mass of the other C - k classes,
    and the top-k indices."""
    log_q = F.log_softmax(outputs.float(), dim=-1)
    top, index = log_q.topk(k, dim=-1)
    rest = log_q.scatter(-1, index, float("-inf")).logsumexp(dim=-1, keepdim=True)
    return TopKReference(torch.cat([top, rest], dim=-1), index.to(torch.int32))


def gathered_log_probs(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The log-probabilities (..., k + 1) of the softmax of `outputs` on the classes `index` (..., k), then on all the
    others merged (computed from the logits, so it stays exact when that mass is tiny)."""
    outputs = outputs.float()
    index = index.long()
    total = outputs.logsumexp(dim=-1, keepdim=True)
    top = outputs.gather(-1, index) - total
    rest = outputs.scatter(-1, index, float("-inf")).logsumexp(dim=-1, keepdim=True) - total
    return torch.cat([top, rest], dim=-1)


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(q || p) over the last dimension from log-probabilities; classes where q is 0 add nothing."""
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1)


def top_k_distance(outputs: torch.Tensor, reference: TopKReference, kind: str) -> torch.Tensor:
    """Per-position softmax distance `kind` (`kl` or `bhattacharyya`) on the k + 1 classes of `reference`."""
    log_p = gathered_log_probs(outputs, reference.index)
    log_q = reference.logprobs.float()
    if kind == "kl":
        return _kl_from_log_probs(log_p, log_q)
    if kind == "bhattacharyya":
        return -torch.logsumexp(0.5 * (log_p + log_q), dim=-1)
    raise ValueError(
        f"FIPConfig.distance={kind!r} cannot be measured on top-k references (log-probabilities): set "
        "distance='kl' or 'bhattacharyya', or reference_mode='full'."
    )


DISTANCE_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "logits": logits_distance,
    "bhattacharyya": bhattacharyya_distance,
    "kl": kl_distance,
}


def functional_distance(
    outputs: torch.Tensor,
    reference: torch.Tensor | TopKReference,
    kind: str = "logits",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """D: mean over anchors (and over positions where `mask` is 1) of the per-position distance `kind`, against full
    reference outputs or a `TopKReference`."""
    if isinstance(reference, TopKReference):
        if outputs.shape[:-1] != reference.index.shape[:-1]:
            raise ValueError(
                f"Outputs of shape {tuple(outputs.shape)} cannot be compared with top-k references over positions "
                f"{tuple(reference.index.shape[:-1])}: the model's output shape changed since `remember` recorded "
                "them."
            )
        return _masked_mean(top_k_distance(outputs, reference, kind), mask)
    if outputs.shape != reference.shape:
        raise ValueError(
            f"Outputs of shape {tuple(outputs.shape)} cannot be compared with reference outputs of shape "
            f"{tuple(reference.shape)}: the model's output shape changed since `remember` recorded them."
        )
    return _masked_mean(DISTANCE_FUNCTIONS[kind](outputs, reference), mask)


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of `per_position` over positions where `mask` is 1 (padding left out), or over all of them."""
    if mask is None or mask.shape != per_position.shape:
        return per_position.mean()
    mask = mask.to(per_position.device, per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def distance_scale(reference: torch.Tensor, kind: str) -> float:
    """The typical size of the outputs, by which D is divided so that `beta` means the same on any model.

    For `logits` it is the mean squared norm of the centred reference outputs (their spread across the last
    dimension), so D / scale is the relative output change; the softmax distances are already scale-free (1.0).
    """
    if kind != "logits" or reference.numel() == 0:
        return 1.0
    return scale_of_rows(row_scales(reference))


def row_scales(outputs: torch.Tensor) -> torch.Tensor:
    """Per anchor, the mean over its positions of the centred squared norm of its outputs (`distance_scale`'s
    summand), so that the scale of outputs too big to hold at once is computed chunk by chunk (`scale_of_rows`)."""
    centred = outputs.float() - outputs.float().mean(dim=-1, keepdim=True)
    norms = centred.pow(2).sum(dim=-1)
    return norms.reshape(norms.shape[0], -1).mean(dim=1) if norms.dim() else norms.reshape(1)  # (N,) outputs: one


def scale_of_rows(rows: torch.Tensor) -> float:
    """`distance_scale` from the `row_scales` of every anchor (anchors have the same positions, so the mean of the
    rows' means is the mean over all positions)."""
    return max(float(rows.mean()), 1e-8)


def anchor_label_loss(
    outputs: torch.Tensor, labels: torch.Tensor, task_type: str | None = None
) -> torch.Tensor | None:
    """Mean cross-entropy of the anchors' logits `outputs` (N, C) or (N, T, C) against their class labels (N,) or
    (N, T), -100 marking none; for a causal LM (`task_type="CAUSAL_LM"`) position t predicts label t + 1, as in
    transformers' own loss; 0 when no anchor of the batch has a label. Summed and divided by the count of labels
    (at least 1) rather than asking whether any label is there, which would wait on the device every step."""
    if outputs.dim() == 3 and labels.dim() == 2:
        length = min(outputs.shape[1], labels.shape[1])
        outputs, labels = outputs[:, :length], labels[:, :length]
        if task_type == "CAUSAL_LM":
            outputs, labels = outputs[:, :-1], labels[:, 1:]
    labels = labels.reshape(-1)
    total = F.cross_entropy(outputs.reshape(labels.shape[0], -1).float(), labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp_min(1)
