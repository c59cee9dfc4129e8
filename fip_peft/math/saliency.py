"""Sparsity scores under the FIP metric: which entries of a target weight `objective="sparsify"` prunes first with
`sparsity_criterion="saliency"` or `"obs"` (`fip_peft.method.sparsifier` gathers the metric and applies them; the
magnitude criterion needs no metric).

Optimal brain damage (`metric_saliency`, LeCun et al. 1990) scores entry (i, j) of a layer's weight by the increase of
the functional distance D when it alone is zeroed, to second order: 1/2 w_ij^2 g_(ij),(ij), with g the metric. Under
the Kronecker metric A (x) G (`fip_peft.math.natural`) the diagonal is g_(ij),(ij) = G_ii A_jj, so the scores need only
the factors' diagonals.

Optimal brain surgeon (`obs_prune`, Hassibi & Stork 1993, as SparseGPT solves it, Frantar & Alistarh 2023) also moves
the kept entries of each row to make up for the pruned ones, under the input factor alone: the layer's reconstruction
error E_x (x (W - W')^T)^2 = tr((W - W') A (W - W')^T) is minimised row by row. Removing entry j of a row and
compensating the rest costs w_j^2 / [H^-1]_jj, H = A + damping; the greedy solve prunes column blocks left to right,
each from the weights as compensated so far, reading H^-1 through its upper Cholesky factor U (U^T U = H^-1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .natural import CoveredLayer


def metric_saliency(
    layer: CoveredLayer, weight: torch.Tensor, a_diag: torch.Tensor, g_diag: torch.Tensor
) -> torch.Tensor:
    """Optimal-brain-damage saliency of every entry of `weight` (shaped like the layer's weight) under the metric:
    w_ij^2 g_(ij),(ij) with the diagonal of A (x) G, g_(ij),(ij) = G_ii A_jj. It is twice the increase of the
    functional distance D when that entry alone is zeroed, to second order: prune the smallest first."""
    matrix = layer.as_matrix(weight.detach().float())
    saliency = matrix.pow(2) * g_diag.to(matrix.device)[:, None] * a_diag.to(matrix.device)[None, : matrix.shape[1]]
    return layer.from_matrix(saliency)[0]


# Damping of the OBS solve: this fraction of the mean of diag(A) is added to A's diagonal (SparseGPT's default).
OBS_DAMPING = 0.01
# Columns whose entries the OBS solve chooses together, from the weights as compensated so far (SparseGPT's block).
OBS_BLOCK = 128


def obs_inverse_factor(a: torch.Tensor) -> torch.Tensor:
    """U upper triangular with U^T U = (A + OBS_DAMPING mean(diag A) I)^-1: what the OBS scores and solve read,
    computed once per input factor (layers that share an input share it)."""
    h = a.float().clone()
    mean = h.diagonal().mean()
    h.diagonal().add_(OBS_DAMPING * mean if mean > 0 else 1.0)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def obs_input_weights(u: torch.Tensor) -> torch.Tensor:
    """1 / [H^-1]_jj from U = `obs_inverse_factor(A)` (H the damped A): w_ij^2 times it is the OBS saliency of entry
    (i, j), the increase of the layer's reconstruction error E_x (x (W - W')^T)^2 when it alone is removed and its row
    compensated. `metric_saliency` with these as the input diagonal and ones as the output diagonal gives it."""
    return 1.0 / u.pow(2).sum(0)


def obs_prune(
    matrix: torch.Tensor,
    u: torch.Tensor,
    sparsity: float,
    pruned: torch.Tensor,
    block: int = OBS_BLOCK,
    pattern: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal brain surgeon under the input factor A = E[x x^T]: prune round(`sparsity` x numel) entries of
    `matrix` (out, in), those already `pruned` first, and move the kept entries of each row to make up for them, so
    that the layer's outputs x W^T on the anchors change as little as the greedy solve finds. Column blocks of `block`
    are pruned left to right, each choosing its share of the entries by w_ij^2 / U_jj^2 after the compensation of
    the blocks before (SparseGPT, Frantar & Alistarh 2023; `u` = `obs_inverse_factor(A)`).
    With an N:M `pattern` (`sparsity` must then be N / M) each group of M consecutive columns instead chooses the N
    entries of every row with the smallest scores when the solve reaches it, from the weights as compensated so far
    (SparseGPT's N:M solve). Returns the new matrix (exact zeros where pruned) and its pruned mask."""
    w = matrix.detach().float().clone()
    rows, cols = w.shape
    if pattern is not None:
        n, m = pattern
        if abs(sparsity - n / m) > 1e-9 or cols % m or block % m:
            raise ValueError(
                f"The {n}:{m} OBS solve prunes to sparsity {n}/{m} exactly, with inputs (and blocks) in groups of "
                f"{m}; got sparsity {sparsity}, {cols} inputs, block {block}."
            )
    u = u.to(w.device)
    chosen_all = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, u1 = w[:, start:end], u[start:end, start:end]
        score = w1.pow(2) / u1.diagonal().pow(2)[None, :]
        already = pruned[:, start:end].to(w.device)
        score[already] = -1.0
        chosen = torch.zeros_like(already)
        if pattern is None:
            count = round(sparsity * rows * end) - round(sparsity * rows * start)
            count = max(count, int(already.sum()))
            chosen.view(-1)[score.flatten().topk(count, largest=False).indices] = True
        errors = torch.zeros_like(w1)
        for i in range(end - start):
            if pattern is not None and i % m == 0:
                group = w1[:, i : i + m].pow(2) / u1.diagonal()[i : i + m].pow(2)[None, :]
                group[already[:, i : i + m]] = -1.0
                chosen[:, i : i + m].scatter_(1, group.topk(n, dim=1, largest=False).indices, True)
            kept = torch.where(chosen[:, i], torch.zeros_like(w1[:, i]), w1[:, i])
            errors[:, i] = (w1[:, i] - kept) / u1[i, i]
            w1[:, i:] -= errors[:, i : i + 1] * u1[i : i + 1, i:]
            w1[:, i] = kept
        w[:, end:] -= errors @ u[start:end, end:]
        chosen_all[:, start:end] = chosen
    return w.masked_fill(chosen_all, 0.0), chosen_all
