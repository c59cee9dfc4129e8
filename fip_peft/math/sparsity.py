"""Sparsity: schedules, masks and counts (the math of `objective="sparsify"`, no PEFT glue).

The sparse projection P_s(w) of weights w zeroes the fraction s of their entries with the smallest score, over all
target weights together (`scope="global"`) or within each weight (`scope="layer"`). The score is the magnitude |w|
(`criterion="magnitude"`), the saliency under the FIP metric (`criterion="saliency"`, `saliency.metric_saliency`) or
the optimal-brain-surgeon saliency under its input factor (`criterion="obs"`, `saliency.obs_input_weights`; the mask
itself then comes from `saliency.obs_prune`, which also compensates the kept entries); an entry already zero scores 0
under all three. Masks here are boolean tensors shaped like the weights, True where an entry is kept.

`scope="2:4"` is N:M structured sparsity (`nm_masks`): in every group of 4 consecutive inputs of a row of the (out,
in) weight matrix, 2 entries are zero, the pattern sparse tensor cores accelerate; its target sparsity is 1/2.

`recommended_recipe` is the table of measured recipes that `FIPConfig`'s unset sparsity fields resolve from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..choices import CRITERIA, SCHEDULES, SCOPES  # noqa: F401 - the examples read them from here


def scheduled_sparsity(step: int, target: float, schedule: str, begin_step: int = 0, ramp_steps: int = 0) -> float:
    """Sparsity s_t after `step` optimizer steps, ramping from 0 at `begin_step` to `target` over `ramp_steps`.

    `"cubic"` is Zhu & Gupta's gradual pruning ramp, s_t = s_f (1 - (1 - t / T)^3), which prunes fast while many
    small weights remain and slowly near the target; `"linear"` is s_t = s_f t / T; `"constant"` is s_f from
    `begin_step` on (the authors' constant target).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if step < begin_step:
        return 0.0
    if schedule == "constant" or ramp_steps <= 0:
        return float(target)
    progress = min(1.0, (step - begin_step) / ramp_steps)
    if schedule == "linear":
        return float(target) * progress
    return float(target) * (1.0 - (1.0 - progress) ** 3)


# ---- the measured defaults -----------------------------------------------------------------------------------------

# Chosen by measurement on MiniLM / Rotten Tomatoes (docs/benchmarks.md, "Sparsification defaults (issue 29)"): below
# this target sparsity magnitude pruning walks best; from it the OBS solve (every layer at the target, pruned at once,
# then repaired); from `SALIENCY_FROM` saliency under the FIP metric with a cubic ramp.
OBS_FROM = 0.75
SALIENCY_FROM = 0.85
# The criterion of the 2:4 pattern, and learning-rate advice for an Adam-like optimizer: the slower rate below
# `FAST_LR_FROM`, where the pull has little to move and the task loss more to spoil, when the ramp is at least as long
# as the one it was measured with (`SLOW_LR_MIN_RAMP` steps; a shorter ramp needs the faster rate for the pull to
# empty the weights before the mask cuts them, see `Sparsifier.check_pace`).
NM_CRITERION = "obs"
SLOW_LR, FAST_LR, FAST_LR_FROM, SLOW_LR_MIN_RAMP = 3e-4, 1e-3, 0.6, 48


@dataclass(frozen=True)
class SparsityRecipe:
    """A sparsify recipe: `criterion`, `scope` and `schedule` (the `FIPConfig.sparsity_*` fields),
    `learning_rate` (advice for an Adam-like optimizer: the pull moves each entry by about it per step) and `why`."""

    criterion: str
    scope: str
    schedule: str
    learning_rate: float
    why: str


def recommended_recipe(
    target_sparsity: float,
    criterion: str | None = None,
    scope: str | None = None,
    schedule: str | None = None,
    ramp_steps: int | None = None,
) -> SparsityRecipe:
    """The best measured recipe at `target_sparsity`, for the fields left `None` (the others are kept as given and
    constrain the rest: `"obs"` needs `scope="layer"` or `"2:4"`, so an explicit `scope="global"` rules it out).

    Unstructured: magnitude (global threshold, cubic ramp) below `OBS_FROM`; OBS (every layer at the target, pruned at
    the first step, the walk repairing) up to `SALIENCY_FROM`; saliency (global, cubic) from there. `scope="2:4"`:
    `NM_CRITERION` at once (constant schedule). Saliency and OBS need remembered anchors (`FIPModel.remember`).
    `learning_rate` is the Adam rate measured with the recipe (`ramp_steps`: the ramp it will run, if known)."""
    if criterion is None:
        if scope == "2:4":
            criterion, why = NM_CRITERION, "the 2:4 pattern"
        elif target_sparsity < OBS_FROM:
            criterion, why = "magnitude", f"target_sparsity {target_sparsity} < {OBS_FROM}"
        elif target_sparsity < SALIENCY_FROM and scope in (None, "layer"):
            criterion, why = "obs", f"{OBS_FROM} <= target_sparsity {target_sparsity} < {SALIENCY_FROM}"
        else:
            criterion = "saliency"
            why = (
                f"target_sparsity {target_sparsity} >= {SALIENCY_FROM}"
                if target_sparsity >= SALIENCY_FROM
                else f"target_sparsity {target_sparsity} >= {OBS_FROM}, sparsity_scope={scope!r} (obs needs 'layer')"
            )
    else:
        why = f"sparsity_criterion={criterion!r} given"
    if scope is None:
        scope = "layer" if criterion == "obs" else "global"
    if schedule is None:
        schedule = "constant" if criterion == "obs" else "cubic"
    ramped = schedule != "constant"
    short = ramped and ramp_steps is not None and ramp_steps < SLOW_LR_MIN_RAMP
    learning_rate = FAST_LR if target_sparsity >= FAST_LR_FROM or short else SLOW_LR
    return SparsityRecipe(criterion, scope, schedule, learning_rate, why)


# ---- N:M structured sparsity ----------------------------------------------------------------------------------------

NM_PATTERNS = {"2:4": (2, 4)}


def nm_pattern(scope: str) -> tuple[int, int] | None:
    """(N, M) of an N:M `scope` (N zeros in every M consecutive inputs of a row), None for "global" and "layer"."""
    return NM_PATTERNS.get(scope)


def nm_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    pattern: tuple[int, int],
    pruned: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep masks of N:M sparsity on (out, in) score matrices: in every group of M consecutive inputs of a row, the
    N entries with the smallest scores (those already `pruned` first) are the candidates; at `sparsity` N / M all of
    them go (the exact pattern), below it the smallest `sparsity` x numel of each matrix among them (a ramp toward
    the pattern that never leaves it: masks only lose entries, and the pruned ones stay candidates)."""
    n, m = pattern
    if not 0.0 <= sparsity <= n / m + 1e-9:
        raise ValueError(f"sparsity must be in [0, {n}/{m}] with the {n}:{m} pattern, got {sparsity}.")
    masks = {}
    for name, score in scores.items():
        rows, cols = score.shape
        if cols % m:
            raise ValueError(
                f"The {n}:{m} pattern needs the inputs of every pruned weight in groups of {m}, but {name!r} has "
                f"{cols} inputs: leave it out of target_modules, or use sparsity_scope='layer'."
            )
        s = score.detach().float().clone()
        if pruned is not None:
            s[pruned[name].to(s.device)] = -1.0
        candidates = torch.zeros_like(s, dtype=torch.bool)
        groups = s.reshape(rows, cols // m, m)
        candidates.view(rows, cols // m, m).scatter_(-1, groups.topk(n, dim=-1, largest=False).indices, True)
        count = _num_pruned(s.numel(), sparsity)
        if count >= int(candidates.sum()):
            prune = candidates
        else:
            prune = torch.zeros_like(candidates)
            ranked = torch.where(candidates, s, torch.full_like(s, float("inf")))
            prune.view(-1)[ranked.flatten().topk(count, largest=False).indices] = True
        masks[name] = ~prune
    return masks


def _num_pruned(numel: int, sparsity: float) -> int:
    return min(numel, int(round(sparsity * numel)))


# Above this many entries the k-th smallest is selected within a band around a sampled estimate (`kth_smallest`).
BAND_SELECT_MIN = 1 << 20
BAND_SAMPLE = 1 << 16
BAND_HALF_WIDTH = 0.01


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry of the 1-D tensor `values` (1-based), exactly `values.kthvalue(k).values`.

    On millions of entries (the global threshold over all target weights, taken at every step) a full selection
    dominates the sparsify step on CPU; instead the quantile k / n is estimated on a strided sample, the entries
    within +-1% of it are selected, and the k-th smallest is looked up among them: a few passes of comparisons and a
    selection on ~2% of the entries. Entries tied with the band's lower end are counted, not selected: once the mask
    has pruned a fraction s, that many entries are exactly 0, and at the target the k-th smallest is one of them.
    Exact whatever the sample: when the band misses the k-th entry, the full selection runs.
    """
    n = values.numel()
    if n < BAND_SELECT_MIN:
        return values.kthvalue(k).values
    sample = values[:: n // BAND_SAMPLE].float()
    quantiles = torch.tensor([max(0.0, k / n - BAND_HALF_WIDTH), min(1.0, k / n + BAND_HALF_WIDTH)])
    low, high = torch.quantile(sample, quantiles.to(sample.device), interpolation="nearest").to(values.dtype)
    below = int((values < low).sum())
    up_to_low = int((values <= low).sum())
    if below < k <= up_to_low:
        return low
    band = values[(values > low) & (values <= high)]
    if up_to_low < k <= up_to_low + band.numel():
        return band.kthvalue(k - up_to_low).values
    return values.kthvalue(k).values


def _keep_above(magnitudes: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Threshold t such that |w| > t keeps all but the `num_pruned` smallest magnitudes (ties aside)."""
    if num_pruned == 0:
        return magnitudes.new_tensor(-1.0)
    return kth_smallest(magnitudes, num_pruned)


def score_masks(scores: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Masks of P_s: keep the (1 - `sparsity`) of the entries with the largest (non-negative) `scores`.

    With `scope="global"` one threshold covers all weights together; with `"layer"` each weight gets its own.
    Entries tied with the threshold are pruned with it, so a weight that already has many exact zeros may end up
    sparser than asked, never less sparse.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer' (N:M patterns: `nm_masks`), got {scope!r}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
    if not scores:
        return {}
    if scope == "layer":
        masks = {}
        for name, score in scores.items():
            flat = score.detach().float().flatten()
            masks[name] = score.detach().float() > _keep_above(flat, _num_pruned(flat.numel(), sparsity))
        return masks
    device = next(iter(scores.values())).device
    flat = torch.cat([score.detach().float().flatten().to(device) for score in scores.values()])
    threshold = _keep_above(flat, _num_pruned(flat.numel(), sparsity))
    return {name: score.detach().float() > threshold.to(score.device) for name, score in scores.items()}


def magnitude_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Masks of the magnitude projection: keep the largest-magnitude (1 - `sparsity`) of the entries of `weights`."""
    return score_masks({name: weight.detach().abs() for name, weight in weights.items()}, sparsity, scope)


def mean_pruned_magnitude(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> float:
    """Mean |w| of the entries `masks` remove (0.0 when they remove none)."""
    total = sum(float(w.detach().abs().float()[~masks[name]].sum()) for name, w in weights.items())
    count = sum(int((~mask).sum()) for mask in masks.values())
    return total / count if count else 0.0


def count_zeros(weights: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Per-weight and overall fraction of entries that are exactly zero, with the counts behind them."""
    layers, zeros, total = {}, 0, 0
    for name, weight in weights.items():
        layer_zeros = int((weight.detach() == 0).sum())
        layers[name] = {"zeros": layer_zeros, "total": weight.numel(), "sparsity": layer_zeros / weight.numel()}
        zeros += layer_zeros
        total += weight.numel()
    return {"layers": layers, "zeros": zeros, "total": total, "sparsity": zeros / total if total else 0.0}
