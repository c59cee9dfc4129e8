"""`FIPModel`: the PEFT tuner that injects FIP layers and keeps each adapter's anchor memory."""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import PreTrainedModel
from transformers.utils import logging

from .anchors import POSITIONAL, AnchorInputs, collect_anchors, num_rows, transform_anchors
from .checks import (
    check_adaptable_targets,
    check_anchor_inputs,
    check_anchor_labels,
    check_anchor_output_module,
    check_anchors_match,
    check_finite_reference,
    check_remember_adapter,
    check_remember_budget,
    check_saved_memory,
)
from .config import FIPConfig
from .distances import anchor_label_loss, distance_scale, functional_distance
from .evaluation import AccuracyMatrix
from .layer import FIPLayer, fip_layer_class
from .memory import ANCHOR_PREFIX, AnchorMemory, check_reference_size
from .model_io import model_output
from .natural import CoveredLayer, metric_saliency, obs_input_weights, obs_inverse_factor, obs_prune
from .sparsity import count_zeros, mean_pruned_magnitude, scheduled_sparsity, score_masks

logger = logging.get_logger(__name__)


def _ramp_end(config: FIPConfig) -> int:
    """The optimizer step at which the mask's schedule reaches `target_sparsity` (a constant schedule has no ramp).
    That step always updates the mask; steps count from 1, so a ramp ending at 0 updates at the first step."""
    ramp = 0 if config.sparsity_schedule == "constant" else config.sparsity_ramp_steps
    return config.sparsity_begin_step + ramp


MEMORY_ATTR = "fip_memory"
REFERENCE_BATCH_SIZE = 64

# Every live FIPModel, for the optimizer step guard below.
_GUARDED_MODELS: weakref.WeakSet = weakref.WeakSet()


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
    models = [model for model in list(_GUARDED_MODELS) if model._remembering_adapters()]
    if not models:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    for model in models:
        model._refuse_plain_step(optimizer, stepped)


register_optimizer_step_pre_hook(_guard_optimizer_step)


class FIPModel(BaseTuner):
    """Creates a functionally-invariant-path adapter on a model.

    Example:

        ```py
        >>> import fip_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, fip_peft.FIPConfig(task_type="SEQ_CLS"))
        >>> model.remember(task_a_dataset)  # anchors + reference outputs of what the model knows now
        >>> optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-4)
        ```
    """

    prefix: str = "fip_"
    tuner_layer_cls = FIPLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._fip_optimizers: weakref.WeakSet = weakref.WeakSet()
        self._sparsity_state: dict[str, dict] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._install_guard()

    def _prepare_adapter_config(self, peft_config: FIPConfig, model_config: dict) -> FIPConfig:
        if peft_config.target_modules is None:
            if not isinstance(self.model, PreTrainedModel):
                raise ValueError(
                    "FIPConfig.target_modules is required for a model that is not a transformers PreTrainedModel: "
                    "name its layers (e.g. ['fc1', 'fc2']), give a regex, or use 'all-linear'."
                )
            peft_config.target_modules = "all-linear"
        return peft_config

    def _prepare_model(self, peft_config: FIPConfig, model: nn.Module) -> None:
        """Refuse any target FIP cannot adapt, or an anchor output module the model lacks, before the first layer is
        replaced."""
        check_adaptable_targets(self, peft_config, model)
        check_anchor_output_module(peft_config.anchor_output_module, model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Inject the FIP layers of `adapter_name` and give it an empty anchor memory."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if MEMORY_ATTR not in self._modules:
            self.fip_memory = nn.ModuleDict()
        self.fip_memory[adapter_name] = AnchorMemory(persistent=self.peft_config[adapter_name].save_anchors)

    def _create_and_replace(
        self, peft_config: FIPConfig, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        kwargs = {
            "rank": peft_config.rank,
            "init_weights": peft_config.init_weights,
            "sparsify": peft_config.objective == "sparsify",
        }
        if isinstance(target, FIPLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"FIP cannot adapt {target_name!r}: it is already adapted by another PEFT method "
                f"({type(target).__name__}). Merge that adapter first (`merge_and_unload()`)."
            )
        new_module = fip_layer_class(target)(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_new_adapter_config(self, config: FIPConfig) -> None:
        super()._check_new_adapter_config(config)
        if len(self.peft_config) > 1 and any(c.objective == "sparsify" for c in self.peft_config.values()):
            raise ValueError(
                "FIPConfig.objective='sparsify' needs the only adapter on the model: its mask prunes the weights that "
                f"all adapters share, and this model already has {sorted(self.peft_config)[:-1]}."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.fip_memory:
            del self.fip_memory[adapter_name]

    # ---- anchors ----------------------------------------------------------------------------------------------------

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; this model has {sorted(self.peft_config)}.")
        return name

    def memory(self, adapter_name: str | None = None) -> AnchorMemory:
        """The anchor memory of `adapter_name` (default: the active adapter)."""
        return self.fip_memory[self._adapter(adapter_name)]

    @contextmanager
    def _evaluating(self):
        """Eval mode for an anchor pass, then every module's own mode back (a submodule kept in eval mode while the
        rest trains, e.g. frozen batch norm, stays in eval mode)."""
        training = [module for module in self.model.modules() if module.training]
        if any(type(module).train is not nn.Module.train for module in training):
            self.model.eval()  # a module with its own `train()` gets it called
        else:  # set the flags directly: `eval()` and nn.Module.__setattr__ cost more than a small model's anchor pass
            for module in training:
                object.__setattr__(module, "training", False)
        try:
            yield
        finally:
            for module in training:
                object.__setattr__(module, "training", True)

    def _run(
        self, inputs: AnchorInputs, forward: nn.Module | None = None, adapter_name: str | None = None
    ) -> torch.Tensor:
        """The outputs FIP keeps on `inputs`: the model's, or those of `FIPConfig.anchor_output_module` (caught by a
        forward hook). Run through `forward` when given (an FSDP2 root, which gathers the shards)."""
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        positional = inputs.pop(POSITIONAL, None)
        forward = self.model if forward is None else forward
        module_name = self.peft_config[self._adapter(adapter_name)].anchor_output_module
        caught = []
        hook = None
        if module_name is not None:
            hook = self.model.get_submodule(module_name).register_forward_hook(lambda m, a, out: caught.append(out))
        try:
            outputs = forward(positional, **inputs) if positional is not None else forward(**inputs)
        finally:
            if hook is not None:
                hook.remove()
        if module_name is None:
            return model_output(outputs)
        if not caught:
            raise RuntimeError(
                f"FIPConfig.anchor_output_module={module_name!r} did not run in the model's forward pass: name a "
                "module between the inputs and the outputs, or None for the model's output."
            )
        return model_output(caught[-1])

    @torch.no_grad()
    def _outputs_on(self, inputs: AnchorInputs, adapter_name: str) -> torch.Tensor:
        with self._evaluating():
            rows = num_rows(inputs)
            chunks = []
            for start in range(0, rows, REFERENCE_BATCH_SIZE):
                chunk = {k: v[start : start + REFERENCE_BATCH_SIZE] for k, v in inputs.items()}
                chunks.append(self._run(chunk, adapter_name=adapter_name).float().cpu())
        return torch.cat(chunks)

    def remember(
        self,
        data,
        num_anchors: int | None = None,
        adapter_name: str | None = None,
        task_name: str | None = None,
        labels=None,
    ) -> dict[str, object]:
        """Add anchors from `data` and record the current outputs on every anchor kept so far.

        Training after this call keeps the function on all remembered anchors. `data` is a tensor of inputs (custom
        `nn.Module`), a dict of batched tensors, a list of such batches, a `datasets.Dataset` with the model's input
        columns, or a `DataLoader`. A tuple or list of tensors of different dtypes or shapes reads as one
        `(inputs, labels, ...)` batch. By default the new task gets an equal share of `anchor_budget`; older tasks
        shrink to share the rest. `task_name` names the task in the adapter's history (`FIPConfig.task_names`, shown
        in the model card).

        Labels travel with the anchors: `labels` (class indices, one per example of `data`; per token for token
        outputs, -100 for none), or else the data's own `labels`/`label` field or column, or the second element of
        `(inputs, labels)` batches. The FIP step then adds `FIPConfig.label_weight` times their cross-entropy on the
        anchors' logits (DER++'s label term) to the output-keeping term. Anchors without labels are kept by their
        outputs alone. They are saved with the adapter like the anchors (`save_anchors`).
        Returns a summary: anchors per task, total and how many are labelled.
        """
        check_remember_adapter(self, adapter_name)
        if task_name is not None and not isinstance(task_name, str):
            raise TypeError(f"`task_name` must be a str or None, got {type(task_name).__name__}.")
        name = self._adapter(adapter_name)
        config: FIPConfig = self.peft_config[name]
        memory = self.fip_memory[name]
        if num_anchors is not None:
            if isinstance(num_anchors, bool) or not isinstance(num_anchors, int):
                raise TypeError(f"`num_anchors` must be an int or None, got {type(num_anchors).__name__}.")
            if not 1 <= num_anchors <= config.anchor_budget:
                raise ValueError(
                    f"`num_anchors` must be between 1 and FIPConfig.anchor_budget={config.anchor_budget}, got "
                    f"{num_anchors}; raise anchor_budget or pass fewer anchors."
                )
        tasks = memory.num_tasks + 1
        wanted = num_anchors if num_anchors is not None else config.anchor_budget // tasks
        if wanted < 1:
            raise ValueError(
                f"FIPConfig.anchor_budget={config.anchor_budget} is too small for {tasks} tasks; raise it to at least "
                f"{tasks}."
            )
        generator = torch.Generator().manual_seed(config.anchor_seed + memory.num_tasks)
        new_inputs, new_labels = collect_anchors(data, self.model, wanted, generator, labels)
        if config.anchor_output_module is not None and new_labels is not None:
            if labels is not None:
                raise ValueError(
                    f"`labels` need the model's logits, but FIPConfig.anchor_output_module="
                    f"{config.anchor_output_module!r} keeps a hidden output: leave `labels` out, or set "
                    "anchor_output_module=None."
                )
            new_labels = None  # the data's own label column is not used: the kept output is not logits
        if memory.input_names and set(memory.input_names) != set(new_inputs):
            raise ValueError(
                f"`remember` got inputs {sorted(new_inputs)} but earlier anchors have {sorted(memory.input_names)}; "
                "pass the same kind of data to every call."
            )
        check_anchor_inputs(new_inputs, self.model)
        check_remember_budget(config.anchor_budget, memory.anchors_per_task(), num_rows(new_inputs))
        try:
            probe = self._outputs_on({k: v[:2] for k, v in new_inputs.items()}, name)
        except Exception as error:  # the model's own error says what is wrong with the inputs
            raise ValueError(
                f"The model cannot run on the anchors given to `remember` (inputs {sorted(new_inputs)}): {error}"
            ) from error
        check_anchors_match(new_inputs, memory.inputs)
        if new_labels is not None:
            check_anchor_labels(new_labels, probe.shape, config.task_type)
        inputs, task_ids, all_labels = memory.with_new_task(new_inputs, config.anchor_budget, new_labels)
        check_reference_size(num_rows(inputs), probe.shape)
        reference = self._outputs_on(inputs, name)
        check_finite_reference(reference)
        memory.replace(inputs, task_ids, reference, distance_scale(reference, config.distance), all_labels)
        config.task_names = [*config.task_names, task_name or f"task {len(config.task_names)}"]
        labelled = int((all_labels != -100).reshape(len(all_labels), -1).any(dim=1).sum())
        summary = {"anchors_per_task": memory.anchors_per_task(), "total": len(memory), "labelled": labelled}
        logger.info(f"FIP adapter {name!r} remembers {summary['total']} anchors: {summary['anchors_per_task']}.")
        return summary

    def record_accuracy(self, matrix: AccuracyMatrix, adapter_name: str | None = None) -> None:
        """Keep the accuracy matrix R with the adapter (`FIPConfig.accuracy_matrix`, saved in adapter_config.json)
        so that the model card and `fip-peft info` show it."""
        if not isinstance(matrix, AccuracyMatrix):
            raise TypeError(f"`matrix` must be a fip_peft.evaluation.AccuracyMatrix, got {type(matrix).__name__}.")
        self.peft_config[self._adapter(adapter_name)].accuracy_matrix = matrix.to_dict()

    def anchor_distance(
        self, adapter_name: str | None = None, forward: nn.Module | None = None
    ) -> torch.Tensor | None:
        """D(w, w_ref) / scale on the next batch of anchors (with grad), or None when nothing is remembered.

        Run in eval mode so that dropout does not blur how far the function moved. `forward`: the module to run the
        anchors through instead of the base model (the FSDP2-sharded root, see `fip_peft.distributed`).
        """
        terms = self.anchor_terms(adapter_name, forward, with_labels=False)
        return None if terms is None else terms[0]

    def anchor_terms(
        self,
        adapter_name: str | None = None,
        forward: nn.Module | None = None,
        with_labels: bool = True,
        transform=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """On the next batch of anchors, from one forward pass (with grad): D(w, w_ref) / scale and the
        cross-entropy of the anchors' logits against their labels (None when the batch has no labelled anchor, the
        adapter's `label_weight` is 0 or `with_labels` is False); None when nothing is remembered. `transform`
        (`anchors.transform_anchors`) augments the anchors afresh; the outputs on them are compared with the
        references recorded on the anchors themselves."""
        name = self._adapter(adapter_name)
        config: FIPConfig = self.peft_config[name]
        memory = self.fip_memory[name]
        if len(memory) == 0:
            return None
        index = memory.next_batch_index(config.anchor_batch_size, config.anchor_seed)
        inputs, reference = memory.batch(index)
        if transform is not None:
            inputs = transform_anchors(transform, inputs)
        with self._evaluating():
            outputs = self._run(inputs, forward, name)
        mask = inputs.get("attention_mask")
        distance = functional_distance(outputs, reference.to(outputs.device), config.distance, mask)
        label_loss = None
        if with_labels and config.label_weight > 0 and config.anchor_output_module is None and memory.has_labels:
            labels = memory.labels[index.to(memory.labels.device)]
            label_loss = anchor_label_loss(outputs, labels.to(outputs.device), config.task_type)
        return distance / memory.scale, label_loss

    def metric_spectrum(self, k: int = 10, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The k largest eigenvalues of the metric g = E[J^T M J] of each layer the natural solver covers (full-rank
        displacements, trained `nn.Linear` heads), from its Kronecker factors on up to `metric_anchors` anchors:
        the paper's low-rank structure (few large eigenvalues, many near zero). Keys are module names."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        from .optimizers.preconditioner import metric_spectrum

        return metric_spectrum(self, self._adapter(adapter_name), k)

    # ---- sparsity (objective="sparsify") ----------------------------------------------------------------------------

    def _sparse_layers(self, name: str) -> dict[str, FIPLayer]:
        layers = {
            key: module
            for key, module in self.model.named_modules()
            if isinstance(module, FIPLayer) and name in module.fip_mask
        }
        if not layers:
            raise ValueError(
                f"Adapter {name!r} prunes nothing: it needs FIPConfig(objective='sparsify', target_sparsity=...) and "
                "target_modules that match layers with weights."
            )
        return layers

    def _sparse_config(self, adapter_name: str | None) -> tuple[str, FIPConfig]:
        name = self._adapter(adapter_name)
        config: FIPConfig = self.peft_config[name]
        if config.objective != "sparsify":
            raise ValueError(
                f"Adapter {name!r} has objective={config.objective!r}; sparsity needs "
                "FIPConfig(objective='sparsify', target_sparsity=...)."
            )
        return name, config

    def apply_sparsity_mask(self, sparsity: float | None = None, adapter_name: str | None = None) -> float:
        """Prune the effective target weights with the smallest score (`FIPConfig.sparsity_criterion`) now, to
        `sparsity` (default: the target), and return the sparsity reached. Pruned entries stay exactly zero from then
        on (forward, merge, save)."""
        name, config = self._sparse_config(adapter_name)
        sparsity = config.target_sparsity if sparsity is None else sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
        self._prune_mask(name, config, sparsity)
        return self.sparsity_report(name)["sparsity"]

    def _sparsity_scores(
        self, name: str, config: FIPConfig, weights: dict[str, torch.Tensor], refresh: bool = False
    ) -> dict[str, torch.Tensor]:
        """Each effective target weight's entries scored by `sparsity_criterion` (prune the smallest first). The
        metric diagonals of saliency or OBS are gathered on the anchors when `refresh` is set or none are kept yet."""
        if config.sparsity_criterion == "magnitude":
            return {key: weight.detach().abs() for key, weight in weights.items()}
        covered = self._sparse_covered(name)
        state = self._sparsity_state.setdefault(name, {"step": 0})
        if refresh or "diagonals" not in state:
            self._gather_sparsity_metric(name, config, covered)
        diagonals = state["diagonals"]
        return {key: metric_saliency(covered[key], weights[key], *diagonals[key]) for key in weights}

    def _sparse_covered(self, name: str) -> dict[str, CoveredLayer]:
        from .optimizers.preconditioner import fip_covered_layer  # it imports this module

        return {
            key: fip_covered_layer(key, layer, layer.fip_delta[name])
            for key, layer in self._sparse_layers(name).items()
        }

    def _gather_sparsity_metric(
        self, name: str, config: FIPConfig, covered: dict[str, CoveredLayer]
    ) -> dict[str, torch.Tensor]:
        """Gather the metric of `sparsity_criterion` on `metric_anchors` anchors and keep the diagonals its scores
        use: diag A and diag G (saliency), or 1 / diag (A + damping)^-1 and ones (OBS). Returns each layer's
        `natural.obs_inverse_factor` of A for the OBS solve (empty for saliency). Refuses, before anything changes,
        when nothing is remembered or a layer's metric is missing."""
        from .optimizers.preconditioner import gather_factors  # it imports this module

        criterion = config.sparsity_criterion
        memory = self.fip_memory[name]
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
        state = self._sparsity_state.setdefault(name, {"step": 0})
        index = memory.batch_index(config.metric_anchors, config.anchor_seed, state["step"])
        seed = config.anchor_seed * 1_000_003 + state["step"]  # of the output directions
        factors = gather_factors(self, name, covered, index, seed, diagonal_only=criterion == "saliency")
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
        state["diagonals"] = diagonals
        return inverses

    def _prune_mask(self, name: str, config: FIPConfig, sparsity: float) -> None:
        """Set every target layer's mask to the projection of its effective weight at `sparsity`, by
        `sparsity_criterion` (the saliency's metric gathered afresh). With `"obs"` the kept entries of each row
        also move to make up for the pruned ones (`natural.obs_prune`), through `delta`."""
        layers = self._sparse_layers(name)
        if any(layer.merged for layer in layers.values()):
            raise ValueError("Unmerge the adapter (`unmerge_adapter()`) before changing its sparsity mask.")
        weights = {key: layer.sparse_weight(name) for key, layer in layers.items()}
        if config.sparsity_criterion == "obs":
            covered = self._sparse_covered(name)
            inverses = self._gather_sparsity_metric(name, config, covered)
            for key, layer in layers.items():
                pruned = covered[key].as_matrix(~layer.fip_mask[name])
                matrix, pruned = obs_prune(covered[key].as_matrix(weights[key]), inverses[key], sparsity, pruned)
                layer.set_sparse_weight(
                    name, covered[key].from_matrix(matrix)[0], ~covered[key].from_matrix(pruned)[0]
                )
        else:
            scores = self._sparsity_scores(name, config, weights, refresh=True)
            for key, mask in score_masks(scores, sparsity, config.sparsity_scope).items():
                layers[key].set_mask(name, mask)
        state = self._sparsity_state.setdefault(name, {"step": 0})
        state["pruned_to"] = max(state.get("pruned_to", 0.0), sparsity)

    def sparsity_step(self, adapter_name: str | None = None) -> None:
        """One optimizer step of the sparsity schedule, called by the FIP optimizer's `step()`: on update steps,
        prune the mask to the scheduled sparsity s_t; then add the pull lambda * (w - P_s_f(w)) to the gradient of
        `delta`, P_s_f the projection of the current weights at the target by `sparsity_criterion` (nonzero on the
        entries it removes; the saliency reuses the metric of the last mask update). Once the mask has pruned the
        target fraction, the entries P_s_f removes are the mask's exact zeros: the pull is zero and a new mask would
        be the same (masks only ever lose entries), so neither is computed.

        Under Adam the pull moves each of those entries by about the learning rate per step whatever lambda, so the
        weights empty before the mask removes them only when the ramp lasts long enough: sparsity_ramp_steps x lr
        near the magnitude of the weights to prune (see docs/benchmarks.md, sparsification).
        """
        name, config = self._sparse_config(adapter_name)
        state = self._sparsity_state.setdefault(name, {"step": 0})
        state["step"] += 1
        step = state["step"]
        if state.get("pruned_to", 0.0) >= config.target_sparsity:
            return
        if step >= config.sparsity_begin_step and (
            step % config.sparsity_update_every == 0 or step == max(_ramp_end(config), 1)
        ):
            sparsity = scheduled_sparsity(
                step,
                config.target_sparsity,
                config.sparsity_schedule,
                config.sparsity_begin_step,
                config.sparsity_ramp_steps,
            )
            self._prune_mask(name, config, sparsity)
        if config.sparsity_lambda == 0 or state.get("pruned_to", 0.0) >= config.target_sparsity:
            return
        layers = {
            key: layer for key, layer in self._sparse_layers(name).items() if layer.fip_delta[name].requires_grad
        }
        weights = {key: layer.sparse_weight(name) for key, layer in layers.items()}
        scores = self._sparsity_scores(name, config, weights)
        target = score_masks(scores, config.target_sparsity, config.sparsity_scope)
        with torch.no_grad():
            for key, layer in layers.items():
                delta = layer.fip_delta[name]
                pull = (config.sparsity_lambda * weights[key] * ~target[key]).to(delta.dtype)
                delta.grad = pull if delta.grad is None else delta.grad.add_(pull)

    def check_sparsity_pace(self, learning_rate: float, adapter_name: str | None = None) -> None:
        """Warn when an optimizer that normalises each entry's step (Adam-like, moving a weight by about
        `learning_rate` per step) cannot pull the weights to prune far toward zero before the mask reaches the target:
        `learning_rate` x the steps until then below half the mean magnitude of those weights. On MiniLM at 80%
        sparsity a twentieth ended at the constant predictor, a sixth lost 8 points to a half (docs/benchmarks.md,
        sparsification). Silent when the mask is asked to cut at the first step (`sparsity_schedule="constant"`
        from step 0): that is a one-shot prune by choice, which the walk then repairs."""
        name, config = self._sparse_config(adapter_name)
        steps = _ramp_end(config)
        if steps == 0 or config.sparsity_lambda == 0:
            return
        weights = {key: layer.sparse_weight(name) for key, layer in self._sparse_layers(name).items()}
        scores = self._sparsity_scores(name, config, weights)
        magnitude = mean_pruned_magnitude(weights, score_masks(scores, config.target_sparsity, config.sparsity_scope))
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

    def get_sparsity_step(self, adapter_name: str | None = None) -> int:
        """Optimizer steps of the sparsity schedule taken so far (what `FIPTrainer` checkpoints)."""
        name, _ = self._sparse_config(adapter_name)
        return self._sparsity_state.get(name, {}).get("step", 0)

    def set_sparsity_step(self, step: int, adapter_name: str | None = None) -> None:
        """Continue the sparsity schedule from `step` optimizer steps (resuming from a checkpoint)."""
        name, _ = self._sparse_config(adapter_name)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
        self._sparsity_state.setdefault(name, {})["step"] = step

    def get_sparsity_metric(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The saliency criterion's metric diagonals from the last mask update, as `"<layer>:input"` (diag A) and
        `"<layer>:output"` (diag G) tensors: what `FIPTrainer` checkpoints, so that a resumed walk pulls by the same
        scores as an uninterrupted one. Empty with the magnitude criterion or before the first update."""
        name, _ = self._sparse_config(adapter_name)
        diagonals = self._sparsity_state.get(name, {}).get("diagonals", {})
        return {
            f"{key}:{part}": t
            for key, pair in diagonals.items()
            for part, t in zip(("input", "output"), pair, strict=True)
        }

    def set_sparsity_metric(self, tensors: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Restore what `get_sparsity_metric` returned (resuming from a checkpoint)."""
        name, _ = self._sparse_config(adapter_name)
        layers = {key.rsplit(":", 1)[0] for key in tensors}
        missing = sorted(
            f"{key}:{part}" for key in layers for part in ("input", "output") if f"{key}:{part}" not in tensors
        )
        if missing:
            raise ValueError(f"The saved saliency metric of adapter {name!r} is incomplete: missing {missing[:3]}.")
        diagonals = {key: (tensors[f"{key}:input"], tensors[f"{key}:output"]) for key in layers}
        self._sparsity_state.setdefault(name, {"step": 0})["diagonals"] = diagonals

    def sparsity_report(self, adapter_name: str | None = None) -> dict[str, object]:
        """Sparsity of the effective target weights `(W + delta) * mask`: `sparsity` (overall fraction of exact
        zeros), `zeros`, `total`, `layers` (per module: zeros, total, sparsity), `target_sparsity` and `step` (the
        optimizer steps of the schedule taken so far). Norms, biases and heads count only if targeted."""
        name, config = self._sparse_config(adapter_name)
        layers = self._sparse_layers(name)
        report = count_zeros({key: layer.sparse_weight(name) for key, layer in layers.items()})
        report["target_sparsity"] = config.target_sparsity
        report["step"] = self.get_sparsity_step(name)
        return report

    # ---- the FIP step guard: no silent plain fine-tuning ------------------------------------------------------------

    def _register_fip_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._fip_optimizers.add(optimizer)

    def _check_fip_step(self) -> None:
        """Refuse a training forward pass with anchors but no FIP optimizer: it would be plain fine-tuning."""
        if not (self.model.training and torch.is_grad_enabled()) or len(self._fip_optimizers):
            return
        remembered = any(len(self.fip_memory[n]) for n in self.active_adapters if n in self.fip_memory)
        if remembered and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(
                "This FIP model has remembered anchors but is being trained without the FIP step, which would "
                "silently fall back to plain fine-tuning. Use `fip_peft.FIPTrainer` instead of `Trainer`, or pass "
                "`optimizers=(fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=...), None)` to `Trainer`, "
                "or build your loop's optimizer with `fip_peft.create_fip_optimizer`."
            )

    def _install_guard(self) -> None:
        tuner = weakref.ref(self)

        def guard(module, args, kwargs):
            if (owner := tuner()) is not None:
                owner._check_fip_step()

        self._guard_handle = self.model.register_forward_pre_hook(guard, with_kwargs=True)
        _GUARDED_MODELS.add(self)

    def _remembering_adapters(self) -> list[str]:
        """The active adapters that have remembered anchors."""
        return [n for n in self.active_adapters if n in self.fip_memory and len(self.fip_memory[n])]

    def _refuse_plain_step(self, optimizer: torch.optim.Optimizer, stepped: set[int]) -> None:
        """Refuse a step of `optimizer` (not a FIP optimizer) that would move a parameter of this model (ids in
        `stepped`: those with a gradient) while an active adapter has remembered anchors."""
        remembering = self._remembering_adapters()
        if not remembering:
            return
        moved = [name for name, p in self.model.named_parameters() if id(p) in stepped]
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

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self._guard_handle.remove()
        _GUARDED_MODELS.discard(self)
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _check_saved_memory(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse a saved anchor memory this model cannot use (`checks.check_saved_memory`, then a forward pass on two
        of its anchors whose outputs must have the saved references' shape), before it is loaded. A failed load
        leaves the model as it was (`fip_peft.saving`)."""
        inputs = {k.removeprefix(ANCHOR_PREFIX): v for k, v in tensors.items() if k.startswith(ANCHOR_PREFIX)}
        if not inputs or "reference" not in tensors:
            return  # empty, or incomplete: `load_tensors` says which
        check_saved_memory(name, tensors, inputs, self.model)
        if any(p.device.type == "meta" for p in self.model.parameters()):
            return  # weights not materialized yet (low_cpu_mem_usage): nothing can run
        try:
            probe = self._outputs_on({k: v[:2] for k, v in inputs.items()}, name)
        except Exception as error:  # the model's own error says what does not fit
            raise ValueError(
                f"The saved anchors of FIP adapter {name!r} (inputs {sorted(inputs)}, shapes "
                f"{[tuple(v.shape[1:]) for v in inputs.values()]} per example) do not fit this model, which cannot "
                f"run on them ({error}). Load the adapter onto the base model it was trained on."
            ) from None
        expected = tuple(tensors["reference"].shape[1:])
        if tuple(probe.shape[1:]) != expected:
            raise ValueError(
                f"The saved reference outputs of FIP adapter {name!r} have shape {expected} per anchor, but this "
                f"model outputs {tuple(probe.shape[1:])} on the saved anchors. Load the adapter onto the base model "
                "it was trained on."
            )

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """Put `new_module` in place of `child` and move FIP's tensors to the base weight's device.

        PEFT's generic version copies `child.weight` onto every module that is not a tuner layer, which fails for a
        `modules_to_save` module with children (a BERT pooler has no `weight` of its own) when `merge_and_unload()`
        puts it back. FIP never builds a bare module that needs the old weight: an FIP layer wraps the base layer,
        and an unloaded module already holds its (trained) weights. So, as LoRA does, no copy.
        """
        setattr(parent, child_name, new_module)
        base = child.base_layer if hasattr(child, "base_layer") else child
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            weight = next(base.parameters(), None)
        if weight is None or weight.device.type == "meta":
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(weight.device)

    # ---- saving and loading the memory ------------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Size the anchor memory to the saved anchors first, so that the generic loading then fills it."""
        marker = f"{MEMORY_ATTR}."
        saved = {k.split(marker, 1)[1]: v for k, v in state_dict.items() if marker in k}
        if saved:
            tuner = next((m for m in model.modules() if isinstance(m, FIPModel)), None)
            if tuner is None:
                logger.warning("The FIP adapter's saved anchors are ignored: the model has no FIPModel to hold them.")
                state_dict = {k: v for k, v in state_dict.items() if marker not in k}
            else:
                tuner._check_saved_memory(adapter_name, saved)
                tuner.fip_memory[adapter_name].load_tensors(saved)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
