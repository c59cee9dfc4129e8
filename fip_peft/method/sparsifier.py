"""`Sparsifier`: the walk of `objective="sparsify"` for one adapter, on a `FIPModel`.

Each optimizer step (`step`, called by the FIP optimizer) advances the schedule: on mask-update steps the mask is
pruned to the scheduled sparsity s_t (`fip_peft.math.sparsity.scheduled_sparsity`); then the pull lambda (w - P_s_f(w))
is added to the gradient of `delta`, P_s_f the projection of the current weights at the target sparsity by
`FIPConfig.sparsity_criterion`. Scores: `fip_peft.math.sparsity` (magnitude, masks, counts) and
`fip_peft.math.saliency` (saliency and OBS under the metric, gathered by `fip_peft.method.metric`).

To add a criterion: its score in `fip_peft.math.saliency` (or `fip_peft.math.sparsity` if it needs no metric), its name
in `fip_peft.math.sparsity.CRITERIA` (which `FIPConfig.sparsity_criterion` checks against), and its case in
`Sparsifier.scores` (and in `Sparsifier.prune` if it moves the kept weights, as OBS does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.utils import logging

from ..math.natural import CoveredLayer
from ..math.saliency import metric_saliency, obs_input_weights, obs_inverse_factor, obs_prune
from ..math.seeds import counter_seed
from ..math.sparsity import count_zeros, mean_pruned_magnitude, nm_masks, nm_pattern, scheduled_sparsity, score_masks
from .checks import is_int, is_number
from .layer import FIPLayer
from .metric import fip_covered_layer, gather_factors

if TYPE_CHECKING:
    from .config import FIPConfig
    from .model import FIPModel

logger = logging.get_logger(__name__)

METRIC_PARTS = ("input", "output")


def ramp_end(config: FIPConfig) -> int:
    """The optimizer step at which the mask's schedule reaches `target_sparsity` (a constant schedule has no ramp).
    That step always updates the mask; steps count from 1, so a ramp ending at 0 updates at the first step."""
    ramp = 0 if config.sparsity_schedule == "constant" else config.sparsity_ramp_steps
    return config.sparsity_begin_step + ramp


@dataclass
class SparsityState:
    """Where one adapter's sparsity walk stands.

    `step`: optimizer steps of the schedule taken so far (checkpointed). `pruned_to`: the largest sparsity the mask
    was pruned to (once it reaches the target, neither mask nor pull is computed again). `diagonals`: per layer, the
    metric diagonals the saliency or OBS scores read, (diag A, diag G), from the last mask update (checkpointed, so
    that a resumed walk pulls by the same scores)."""

    step: int = 0
    pruned_to: float = 0.0
    diagonals: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Sparsifier:
    """The sparsity walk of adapter `adapter` of `fip_model` (`FIPConfig(objective="sparsify")`): mask pruning,
    pull, pace warning and report, and its `SparsityState`."""

    def __init__(self, fip_model: FIPModel, adapter: str) -> None:
        self.fip_model = fip_model
        self.adapter = adapter
        self.state = SparsityState()

    @property
    def config(self) -> FIPConfig:
        return self.fip_model.peft_config[self.adapter]

    # ---- state ------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """`{"step": int, "metric": {"<layer>:input": diag A, "<layer>:output": diag G}}`: what a checkpoint keeps
        (`pruned_to` is not kept: a resumed walk prunes the mask again at its next update step)."""
        metric = {
            f"{key}:{part}": t
            for key, pair in self.state.diagonals.items()
            for part, t in zip(METRIC_PARTS, pair, strict=True)
        }
        return {"step": self.state.step, "metric": metric}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what `state_dict` returned; either key may be left out (the trainer keeps them in two files)."""
        if "step" in state:
            step = state["step"]
            if not is_int(step) or step < 0:
                raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
            self.state.step = step
        if "metric" in state:
            tensors = state["metric"]
            layers = {key.rsplit(":", 1)[0] for key in tensors}
            missing = sorted(
                f"{key}:{part}" for key in layers for part in METRIC_PARTS if f"{key}:{part}" not in tensors
            )
            if missing:
                raise ValueError(
                    f"The saved saliency metric of adapter {self.adapter!r} is incomplete: missing {missing[:3]}."
                )
            self.state.diagonals = {key: tuple(tensors[f"{key}:{part}"] for part in METRIC_PARTS) for key in layers}

    # ---- the walk ---------------------------------------------------------------------------------------------------

    def layers(self) -> dict[str, FIPLayer]:
        """The FIP layers whose weights the adapter prunes (refused when there are none)."""
        layers = {
            key: module
            for key, module in self.fip_model.model.named_modules()
            if isinstance(module, FIPLayer) and self.adapter in module.fip_mask
        }
        if not layers:
            raise ValueError(
                f"Adapter {self.adapter!r} prunes nothing: it needs FIPConfig(objective='sparsify', "
                "target_sparsity=...) and target_modules that match layers with weights."
            )
        return layers

    def step(self) -> None:
        """One optimizer step of the schedule: on update steps, prune the mask to the scheduled sparsity s_t; then
        add the pull lambda * (w - P_s_f(w)) to the gradient of `delta` (the saliency reuses the metric of the last
        mask update). Once the mask has pruned the target fraction, the entries P_s_f removes are the mask's exact
        zeros: the pull is zero and a new mask would be the same (masks only ever lose entries), so neither is
        computed.

        Under Adam the pull moves each of those entries by about the learning rate per step whatever lambda, so the
        weights empty before the mask removes them only when the ramp lasts long enough: sparsity_ramp_steps x lr
        near the magnitude of the weights to prune (see docs/benchmarks.md, sparsification).
        """
        config, state, name = self.config, self.state, self.adapter
        state.step += 1
        if state.pruned_to >= config.target_sparsity:
            return
        if state.step >= config.sparsity_begin_step and (
            state.step % config.sparsity_update_every == 0 or state.step == max(ramp_end(config), 1)
        ):
            self.prune(
                scheduled_sparsity(
                    state.step,
                    config.target_sparsity,
                    config.sparsity_schedule,
                    config.sparsity_begin_step,
                    config.sparsity_ramp_steps,
                )
            )
        if config.sparsity_lambda == 0 or state.pruned_to >= config.target_sparsity:
            return
        layers = {key: layer for key, layer in self.layers().items() if layer.fip_delta[name].requires_grad}
        weights = {key: layer.sparse_weight(name) for key, layer in layers.items()}
        target = self.masks(self.scores(weights), config.target_sparsity)
        with torch.no_grad():
            for key, layer in layers.items():
                delta = layer.fip_delta[name]
                pull = (config.sparsity_lambda * weights[key] * ~target[key]).to(delta.dtype)
                delta.grad = pull if delta.grad is None else delta.grad.add_(pull)

    def apply_mask(self, sparsity: float | None = None) -> float:
        """Prune to `sparsity` (default: the target) now, and return the sparsity reached."""
        sparsity = self.config.target_sparsity if sparsity is None else sparsity
        if not is_number(sparsity) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
        self.prune(sparsity)
        return self.report()["sparsity"]

    def prune(self, sparsity: float) -> None:
        """Set every target layer's mask to the projection of its effective weight at `sparsity`, by
        `sparsity_criterion` (the saliency's metric gathered afresh). With `"obs"` the kept entries of each row
        also move to make up for the pruned ones (`saliency.obs_prune`), through `delta`."""
        config, name = self.config, self.adapter
        layers = self.layers()
        if any(layer.merged for layer in layers.values()):
            raise ValueError("Unmerge the adapter (`unmerge_adapter()`) before changing its sparsity mask.")
        self.check_recipe()
        weights = {key: layer.sparse_weight(name) for key, layer in layers.items()}
        if config.sparsity_criterion == "obs":
            pattern = nm_pattern(config.sparsity_scope)
            if pattern is not None and abs(sparsity - pattern[0] / pattern[1]) > 1e-9:
                raise ValueError(
                    f"sparsity_criterion='obs' with sparsity_scope={config.sparsity_scope!r} prunes to the whole "
                    f"pattern ({pattern[0]}/{pattern[1]}) at once, not to {sparsity}: use "
                    "sparsity_schedule='constant'."
                )
            covered = self._covered()
            inverses = self._gather_metric(covered)
            for key, layer in layers.items():
                pruned = covered[key].as_matrix(~layer.fip_mask[name])
                matrix, pruned = obs_prune(
                    covered[key].as_matrix(weights[key]), inverses[key], sparsity, pruned, pattern=pattern
                )
                layer.set_sparse_weight(
                    name, covered[key].from_matrix(matrix)[0], ~covered[key].from_matrix(pruned)[0]
                )
        else:
            scores = self.scores(weights, refresh=True)
            for key, mask in self.masks(scores, sparsity).items():
                layers[key].set_mask(name, mask)
        self.state.pruned_to = max(self.state.pruned_to, sparsity)

    def masks(self, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
        """Keep masks of the projection at `sparsity` by `scores` (weight-shaped), within `sparsity_scope`: one
        threshold over all weights, one per weight, or the N:M pattern on each weight's (out, in) matrix (the entries
        the mask already pruned chosen first, so the pattern holds at every step)."""
        config = self.config
        pattern = nm_pattern(config.sparsity_scope)
        if pattern is None:
            return score_masks(scores, sparsity, config.sparsity_scope)
        covered, layers = self._covered(), self.layers()
        matrices = {key: covered[key].as_matrix(score) for key, score in scores.items()}
        pruned = {key: covered[key].as_matrix(~layers[key].fip_mask[self.adapter]) for key in scores}
        masks = nm_masks(matrices, sparsity, pattern, pruned)
        return {key: covered[key].from_matrix(mask)[0] for key, mask in masks.items()}

    def check_recipe(self) -> None:
        """Where `sparsity_criterion` was left unset and resolved from `target_sparsity` (listed in
        `FIPConfig.sparsity_defaults`), check at run time what the resolution could not know: remembered anchors
        (saliency and OBS score on them; refused, naming the fix, since a walk without anchors would not keep the
        function) and embeddings among the target layers (OBS cannot compensate through token ids: saliency instead,
        with a one-time warning)."""
        config, name = self.config, self.adapter
        if "sparsity_criterion" not in config.sparsity_defaults or config.sparsity_criterion == "magnitude":
            return
        if len(self.fip_model.memory(name)) == 0:
            raise ValueError(
                f"FIPConfig.sparsity_criterion was left unset and resolved to {config.sparsity_criterion!r} for "
                f"target_sparsity={config.target_sparsity} (the best measured recipe), which scores the weights on "
                f"the remembered anchors, and adapter {name!r} has none: call `model.remember(data)` before training "
                "(without anchors the walk cannot keep the function), or set sparsity_criterion='magnitude'."
            )
        if config.sparsity_criterion == "obs":
            embeddings = [key for key, layer in self._covered().items() if layer.kind == "embedding"]
            if embeddings:
                logger.warning(
                    f"FIP sparsify: sparsity_criterion was left unset and resolved to 'obs' for target_sparsity="
                    f"{config.target_sparsity}, but the target layers include embeddings {embeddings[:3]}, which OBS "
                    "cannot prune (their inputs are token ids): using sparsity_criterion='saliency' instead. Set "
                    "sparsity_criterion explicitly to silence this."
                )
                config.sparsity_criterion = "saliency"

    def scores(self, weights: dict[str, torch.Tensor], refresh: bool = False) -> dict[str, torch.Tensor]:
        """Each effective target weight's entries scored by `sparsity_criterion` (prune the smallest first). The
        metric diagonals of saliency or OBS are gathered on the anchors when `refresh` is set or none are kept yet."""
        if self.config.sparsity_criterion == "magnitude":
            return {key: weight.detach().abs() for key, weight in weights.items()}
        covered = self._covered()
        if refresh or not self.state.diagonals:
            self._gather_metric(covered)
        diagonals = self.state.diagonals
        return {key: metric_saliency(covered[key], weights[key], *diagonals[key]) for key in weights}

    def _covered(self) -> dict[str, CoveredLayer]:
        return {
            key: fip_covered_layer(key, layer, layer.fip_delta[self.adapter]) for key, layer in self.layers().items()
        }

    def _gather_metric(self, covered: dict[str, CoveredLayer]) -> dict[str, torch.Tensor]:
        """Gather the metric of `sparsity_criterion` on `metric_anchors` anchors and keep the diagonals its scores
        use: diag A and diag G (saliency), or 1 / diag (A + damping)^-1 and ones (OBS). Returns each layer's
        `saliency.obs_inverse_factor` of A for the OBS solve (empty for saliency). Refuses, before anything changes,
        when nothing is remembered or a layer's metric is missing."""
        config, name = self.config, self.adapter
        criterion = config.sparsity_criterion
        memory = self.fip_model.memory(name)
        if len(memory) == 0:
            raise ValueError(
                f"FIPConfig.sparsity_criterion={criterion!r} scores weights on the remembered anchors, and adapter "
                f"{name!r} has none: call `model.remember(data)` first, or use sparsity_criterion='magnitude'."
            )
        if criterion == "obs":
            embeddings = [key for key, layer in covered.items() if layer.kind == "embedding"]
            if embeddings:
                raise ValueError(
                    f"FIPConfig.sparsity_criterion='obs' cannot prune embeddings {embeddings[:3]} (their inputs are "
                    "token ids, with no input factor to compensate through): remove them from target_modules, or use "
                    "sparsity_criterion='saliency'."
                )
        index = memory.batch_index(config.metric_anchors, config.anchor_seed, self.state.step)
        seed = counter_seed(config.anchor_seed, self.state.step)  # of the output directions
        factors = gather_factors(self.fip_model, name, covered, index, seed, diagonal_only=criterion == "saliency")
        inverses: dict[str, torch.Tensor] = {}
        if criterion == "obs":
            by_factor: dict[int, torch.Tensor] = {}  # layers sharing an input share its A tensor
            for key, a in factors.input_moments().items():
                if id(a) not in by_factor:
                    by_factor[id(a)] = obs_inverse_factor(a)
                inverses[key] = by_factor[id(a)]
        diagonals = (
            factors.diagonals()
            if criterion == "saliency"
            else {key: (obs_input_weights(u), torch.ones(1)) for key, u in inverses.items()}
        )
        missing = sorted(set(covered) - set(diagonals))
        if missing:
            raise ValueError(
                f"FIPConfig.sparsity_criterion={criterion!r} found no metric for {missing[:3]}: the anchors' outputs "
                "do not depend on them (check FIPConfig.anchor_output_module), or use sparsity_criterion='magnitude'."
            )
        self.state.diagonals = diagonals
        return inverses

    # ---- pace and report --------------------------------------------------------------------------------------------

    def check_pace(self, learning_rate: float) -> None:
        """Warn when an optimizer that normalises each entry's step (Adam-like, moving a weight by about
        `learning_rate` per step) cannot pull the weights to prune far toward zero before the mask reaches the target:
        `learning_rate` x the steps until then below half the mean magnitude of those weights. On MiniLM at 80%
        sparsity a twentieth ended at the constant predictor, a sixth lost 8 points to a half (docs/benchmarks.md,
        sparsification). Silent when the mask is asked to cut at the first step (`sparsity_schedule="constant"`
        from step 0): that is a one-shot prune by choice, which the walk then repairs."""
        config = self.config
        steps = ramp_end(config)
        if steps == 0 or config.sparsity_lambda == 0:
            return
        self.check_recipe()
        weights = {key: layer.sparse_weight(self.adapter) for key, layer in self.layers().items()}
        masks = self.masks(self.scores(weights), config.target_sparsity)
        magnitude = mean_pruned_magnitude(weights, masks)
        if learning_rate * steps < magnitude / 2:
            knob = "sparsity_begin_step" if config.sparsity_schedule == "constant" else "sparsity_ramp_steps"
            logger.warning(
                "FIP sparsify: the optimizer moves each weight by about its learning rate per step, "
                f"{learning_rate:g} x {steps} steps = {learning_rate * steps:.3g} before the mask reaches "
                f"target_sparsity={config.target_sparsity}, but the weights to prune average {magnitude:.3g} in "
                "magnitude: the mask will cut them before the pull shrinks them, and the outputs on the anchors may "
                f"collapse. Raise the learning rate or FIPConfig.{knob} until their product reaches at least "
                f"{magnitude / 2:.2g}."
            )

    def report(self) -> dict[str, object]:
        """Sparsity of the effective target weights `(W + delta) * mask`: `sparsity` (overall fraction of exact
        zeros), `zeros`, `total`, `layers` (per module: zeros, total, sparsity), `target_sparsity` and `step` (the
        optimizer steps of the schedule taken so far). Norms, biases and heads count only if targeted."""
        layers = self.layers()
        report = count_zeros({key: layer.sparse_weight(self.adapter) for key, layer in layers.items()})
        report["target_sparsity"] = self.config.target_sparsity
        report["step"] = self.state.step
        return report
