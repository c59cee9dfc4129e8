"""`FIPModel`: the PEFT tuner that injects FIP layers and keeps each adapter's anchor memory."""

from __future__ import annotations

import weakref

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from ..math.distances import anchor_label_loss, functional_distance
from .accuracy import AccuracyMatrix
from .anchor_pass import anchor_outputs, base_outputs, eval_mode, probe_outputs, record_references
from .anchors import collect_anchors, is_text, num_rows, text_windows, transform_anchors
from .checks import (
    anchors_to_take,
    check_adaptable_targets,
    check_anchor_inputs,
    check_anchor_labels,
    check_anchor_output_module,
    check_anchors_match,
    check_finite_reference,
    check_remember_adapter,
    check_remember_budget,
    check_same_input_names,
    check_saved_memory_fits,
    labels_to_keep,
)
from .config import FIPConfig
from .layer import FIPLayer, fip_layer_class
from .memory import AnchorMemory
from .metric import metric_spectrum
from .sparsifier import Sparsifier
from .step_guard import GUARDED_MODELS, install_guard

logger = logging.get_logger(__name__)

MEMORY_ATTR = "fip_memory"


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
        self._sparsifiers: dict[str, Sparsifier] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._guard_handle = install_guard(self)

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
        self._sparsifiers.pop(adapter_name, None)

    # ---- anchors ----------------------------------------------------------------------------------------------------

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; this model has {sorted(self.peft_config)}.")
        return name

    def memory(self, adapter_name: str | None = None) -> AnchorMemory:
        """The anchor memory of `adapter_name` (default: the active adapter)."""
        return self.fip_memory[self._adapter(adapter_name)]

    @property
    def active_config(self) -> FIPConfig:
        """The config of the active adapter (the first, when several are active)."""
        return self.peft_config[self.active_adapters[0]]

    def remember(
        self,
        data,
        num_anchors: int | None = None,
        adapter_name: str | None = None,
        task_name: str | None = None,
        labels=None,
        tokenizer=None,
        max_length: int | None = None,
    ) -> dict[str, object]:
        """Add anchors from `data` and record the current outputs on every anchor kept so far.

        Training after this call keeps the function on all remembered anchors. `data` is a tensor of inputs (custom
        `nn.Module`), a dict of batched tensors, a list of such batches, a `datasets.Dataset` with the model's input
        columns, a `DataLoader`, or raw text (a str, a list of str, a `datasets.Dataset` with a `text` column) with
        `tokenizer=` and `max_length=`, packed into windows of `max_length` tokens (`anchors.text_windows`). A tuple or
        list of tensors of different dtypes or shapes reads as one `(inputs, labels, ...)` batch. By default the new
        task gets an equal share of `anchor_budget`; older tasks shrink to share the rest. `task_name` names the task
        in the adapter's history (`FIPConfig.task_names`, shown in the model card).

        Labels travel with the anchors: `labels` (class indices, one per example of `data`; per token for token
        outputs, -100 for none), or else the data's own `labels`/`label` field or column, or the second element of
        `(inputs, labels)` batches; raw text remembered by a causal LM is labelled by its own next tokens. The FIP
        step then adds `FIPConfig.label_weight` times their cross-entropy on the anchors' logits (DER++'s label term)
        to the output-keeping term; anchors without labels are kept by their outputs alone. Labels are saved with the
        anchors (`save_anchors`). Returns a summary: anchors per task, total and how many are labelled."""
        check_remember_adapter(self, adapter_name)
        name = self._adapter(adapter_name)
        config: FIPConfig = self.peft_config[name]
        data = _text_as_anchors(data, tokenizer, max_length, next_tokens=config.task_type == "CAUSAL_LM")
        memory = self.fip_memory[name]
        wanted = anchors_to_take(num_anchors, task_name, config.anchor_budget, memory.num_tasks)
        generator = torch.Generator().manual_seed(config.anchor_seed + memory.num_tasks)
        new_inputs, new_labels = collect_anchors(data, self.model, wanted, generator, labels)
        new_labels = labels_to_keep(labels, new_labels, config.anchor_output_module)
        check_same_input_names(new_inputs, memory.input_names)
        check_anchor_inputs(new_inputs, self.model)
        check_remember_budget(config.anchor_budget, memory.anchors_per_task(), num_rows(new_inputs))
        probe = probe_outputs(self.model, new_inputs, config.anchor_output_module)
        check_anchors_match(new_inputs, memory.inputs)
        if new_labels is not None:
            check_anchor_labels(new_labels, probe.shape, config.task_type)
        inputs, task_ids, all_labels = memory.with_new_task(new_inputs, config.anchor_budget, new_labels)
        reference, scale = record_references(self.model, inputs, config, probe, new_inputs)
        check_finite_reference(reference)
        memory.replace(inputs, task_ids, reference, scale, all_labels)
        config.task_names = [*config.task_names, task_name or f"task {len(config.task_names)}"]
        labelled = int((all_labels != -100).reshape(len(all_labels), -1).any(dim=1).sum())
        summary = {"anchors_per_task": memory.anchors_per_task(), "total": len(memory), "labelled": labelled}
        logger.info(f"FIP adapter {name!r} remembers {summary['total']} anchors: {summary['anchors_per_task']}.")
        return summary

    def record_accuracy(self, matrix: AccuracyMatrix, adapter_name: str | None = None) -> None:
        """Keep the accuracy matrix R with the adapter (`FIPConfig.accuracy_matrix`, saved in adapter_config.json)
        so that the model card and `fip-peft info` show it."""
        if not isinstance(matrix, AccuracyMatrix):
            raise TypeError(
                f"`matrix` must be a fip_peft.method.accuracy.AccuracyMatrix, got {type(matrix).__name__}."
            )
        self.peft_config[self._adapter(adapter_name)].accuracy_matrix = matrix.to_dict()

    def anchor_distance(
        self, adapter_name: str | None = None, forward: nn.Module | None = None
    ) -> torch.Tensor | None:
        """D(w, w_ref) / scale on the next batch of anchors (with grad), or None when nothing is remembered.

        Run in eval mode so that dropout does not blur how far the function moved. `forward`: the module to run the
        anchors through instead of the base model (the FSDP2-sharded root, see `fip_peft.optimizers.distributed`).
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
        if reference is None:  # reference_mode="recompute": the base model's outputs, on the anchors as remembered
            reference = base_outputs(self.model, inputs, config.anchor_output_module, forward)
        if transform is not None:
            inputs = transform_anchors(transform, inputs)
        with eval_mode(self.model):
            outputs = anchor_outputs(self.model, inputs, config.anchor_output_module, forward)
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
        return metric_spectrum(self, self._adapter(adapter_name), k)

    # ---- sparsity (objective="sparsify"): thin delegates to each adapter's `Sparsifier` -----------------------------

    def sparsifier(self, adapter_name: str | None = None) -> Sparsifier:
        """The sparsity walk of `adapter_name` (default: the active adapter), which needs `objective="sparsify"`."""
        name = self._adapter(adapter_name)
        objective = self.peft_config[name].objective
        if objective != "sparsify":
            raise ValueError(
                f"Adapter {name!r} has objective={objective!r}; sparsity needs "
                "FIPConfig(objective='sparsify', target_sparsity=...)."
            )
        if name not in self._sparsifiers:
            self._sparsifiers[name] = Sparsifier(self, name)
        return self._sparsifiers[name]

    def apply_sparsity_mask(self, sparsity: float | None = None, adapter_name: str | None = None) -> float:
        """Prune the target weights by `FIPConfig.sparsity_criterion` to `sparsity` (default: the target) now; return
        the sparsity reached. Pruned entries stay exactly zero from then on (forward, merge, save)."""
        return self.sparsifier(adapter_name).apply_mask(sparsity)

    def sparsity_step(self, adapter_name: str | None = None) -> None:
        """One optimizer step of the sparsity schedule (`Sparsifier.step`), called by the FIP optimizer's `step()`."""
        self.sparsifier(adapter_name).step()

    def check_sparsity_pace(self, learning_rate: float, adapter_name: str | None = None) -> None:
        """Warn when an Adam-like optimizer at `learning_rate` is too slow for the ramp (`Sparsifier.check_pace`)."""
        self.sparsifier(adapter_name).check_pace(learning_rate)

    def get_sparsity_step(self, adapter_name: str | None = None) -> int:
        """Optimizer steps of the sparsity schedule taken so far (what `FIPTrainer` checkpoints)."""
        return self.sparsifier(adapter_name).state.step

    def set_sparsity_step(self, step: int, adapter_name: str | None = None) -> None:
        """Continue the sparsity schedule from `step` optimizer steps (resuming from a checkpoint)."""
        self.sparsifier(adapter_name).load_state_dict({"step": step})

    def get_sparsity_metric(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The saliency or OBS metric diagonals of the last mask update (`"<layer>:input"` diag A, `"<layer>:output"`
        diag G; what `FIPTrainer` checkpoints); empty with the magnitude criterion or before the first update."""
        return self.sparsifier(adapter_name).state_dict()["metric"]

    def set_sparsity_metric(self, tensors: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Restore what `get_sparsity_metric` returned (resuming from a checkpoint)."""
        self.sparsifier(adapter_name).load_state_dict({"metric": tensors})

    def sparsity_report(self, adapter_name: str | None = None) -> dict[str, object]:
        """Zeros of the effective target weights `(W + delta) * mask`, overall and per layer (`Sparsifier.report`)."""
        return self.sparsifier(adapter_name).report()

    def _register_fip_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._fip_optimizers.add(optimizer)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self._guard_handle.remove()
        GUARDED_MODELS.discard(self)
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """Put `new_module` in place of `child` and move FIP's tensors to the base weight's device. Unlike PEFT's
        generic version, no copy of `child.weight` (as LoRA): it fails for a `modules_to_save` module with children (a
        BERT pooler) on `merge_and_unload()`, and no FIP module needs it (a FIP layer wraps the base layer)."""
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
                output_module = tuner.peft_config[adapter_name].anchor_output_module
                check_saved_memory_fits(adapter_name, saved, tuner.model, output_module)
                tuner.fip_memory[adapter_name].load_tensors(saved)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _text_as_anchors(data, tokenizer, max_length: int | None, next_tokens: bool = False):
    """`remember`'s `data` as token windows when it is raw text (a str, a list of str, a `datasets.Dataset` with a
    `text` column and no `input_ids`), else `data` itself; refuses a `tokenizer` or `max_length` given with data that
    is already tokens, which would otherwise be silently ignored. `next_tokens` (a causal LM): the windows carry their
    own tokens as labels (-100 on padding), as `DataCollatorForLanguageModeling` makes them, so that the label term
    keeps the model predicting the remembered text (DER++'s label term; `label_weight=0` keeps the outputs alone)."""
    column = getattr(data, "column_names", None)
    if isinstance(column, list) and "text" in column and "input_ids" not in column and tokenizer is not None:
        data = list(data["text"])
    if is_text(data):
        windows = text_windows(data, tokenizer, max_length)
        if next_tokens:
            windows["labels"] = windows["input_ids"].masked_fill(windows["attention_mask"] == 0, -100)
        return windows
    if tokenizer is not None or max_length is not None:
        given = "`tokenizer`" if tokenizer is not None else f"`max_length={max_length}`"
        raise ValueError(
            f"`remember` got {given} with data of type {type(data).__name__}, which is not raw text: pass the text "
            "itself (a str or a list of str) to tokenize, or leave out `tokenizer` and `max_length` for token tensors."
        )
    return data
