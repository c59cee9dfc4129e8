"""Checks that refuse bad input before any work starts, and the search for NaN/inf values.

Every error names the argument or config field at fault and what would work. Nothing here changes a model.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from torch import nn

if TYPE_CHECKING:
    from .config import FIPConfig
    from .model import FIPModel

# Inputs that index an embedding table: integer ids below the table's size.
ID_INPUTS = ("input_ids", "token_type_ids", "position_ids")
# Float inputs whose later dimensions may differ between tasks (sequences, right-padded when anchors combine).
SEQUENCE_FLOAT_INPUTS = ("inputs_embeds",)


class NonFiniteStepError(RuntimeError):
    """An optimizer step met a NaN or infinite gradient or anchor distance and `FIPConfig.on_nonfinite="raise"`."""


def is_int(value: object) -> bool:
    """An int that is not a bool (Python's `True` is an int; no count or seed should accept it)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- layers FIP can adapt -------------------------------------------------------------------------------------------


def _weight_of(module: nn.Module) -> object:
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):  # torch.ao quantized modules expose weight()
        try:
            weight = weight()
        except Exception:  # noqa: BLE001 - any failure means there is no usable weight tensor
            return None
    return weight


def check_adaptable_layer(name: str, module: nn.Module) -> None:
    """Refuse a target FIP cannot adapt: quantized, scripted/frozen by TorchScript, or adapted by another method.

    A base layer frozen in the usual sense (`requires_grad=False`) is fine: FIP never trains the base weight, it adds
    a trainable displacement beside it. What FIP cannot adapt is a weight that is not a floating-point tensor the
    module's forward reads (quantized weights, TorchScript modules whose graph baked the weight in).
    """
    from .layer import FIPLayer, fip_layer_class

    if isinstance(module, FIPLayer):
        return
    kind = f"{type(module).__module__}.{type(module).__name__}"
    if isinstance(module, BaseTunerLayer):
        raise TypeError(
            f"FIP cannot adapt {name!r}: it is already adapted by another PEFT method ({type(module).__name__}). "
            "Merge that adapter first (`merge_and_unload()`)."
        )
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            f"FIP cannot adapt {name!r} ({kind}): a TorchScript (scripted or `torch.jit.freeze`d) module bakes its "
            "weight into its graph. Adapt the eager model and script it afterwards."
        )
    weight = _weight_of(module)
    if isinstance(weight, torch.Tensor) and (weight.is_quantized or not weight.is_floating_point()):
        raise TypeError(
            f"FIP cannot adapt {name!r} ({kind}): its weight has dtype {weight.dtype}. FIP adds a floating-point "
            "displacement to a floating-point weight, so quantized layers (torch.ao, bitsandbytes, GPTQ, ...) are not "
            f"supported: leave {name!r} out of target_modules (or add it to exclude_modules), or load the model "
            "unquantized."
        )
    try:
        fip_layer_class(module)
    except TypeError as error:
        raise TypeError(f"FIP cannot adapt {name!r} ({kind}): {error}") from None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"FIP cannot adapt {name!r} ({kind}): it has no weight tensor.")


def check_adaptable_targets(tuner: FIPModel, config: FIPConfig, model: nn.Module) -> None:
    """Check every module `config` targets before any is replaced, so that a refusal leaves the model untouched."""
    config = _maybe_include_all_linear_layers(copy.copy(config), model)
    adapted = [key + "." for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for key, module in model.named_modules():
        if not key or any(key.startswith(prefix) for prefix in adapted):
            continue
        matched = tuner._check_target_module_exists(config, key)
        if matched and not isinstance(matched, _ExcludedModule):
            check_adaptable_layer(key, module)


def check_anchor_output_module(name: str | None, model: nn.Module) -> None:
    """`FIPConfig.anchor_output_module` must name a submodule of the base model; suggest the closest names if not."""
    if name is None:
        return
    names = [key for key, _ in model.named_modules() if key]
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(
        f"FIPConfig.anchor_output_module={name!r} is not a submodule of {type(model).__name__}: give a name from "
        f"`model.named_modules()` (e.g. the pooler of a classifier), or None for the model's output.{hint}"
    )


# ---- anchors --------------------------------------------------------------------------------------------------------


def _embedding_rows(module: object) -> int | None:
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def id_limits(model: nn.Module) -> dict[str, int]:
    """How many rows each id input's embedding table has: ids must be below it."""
    limits = {}
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            rows = _embedding_rows(get_embeddings())
        except (NotImplementedError, AttributeError):
            rows = None
        if rows is not None:
            limits["input_ids"] = rows
    config = getattr(model, "config", None)
    for name, field in (("token_type_ids", "type_vocab_size"), ("position_ids", "max_position_embeddings")):
        size = getattr(config, field, None)
        if isinstance(size, int) and size > 0:
            limits[name] = size
    return limits


def check_anchor_inputs(inputs: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse anchors of the wrong dtype, with ids outside the model's vocabulary (before the model sees them: on a GPU
    an out-of-range id is a device-side assert), or with NaN/inf values."""
    limits = id_limits(model)
    for name, value in inputs.items():
        if name in ID_INPUTS:
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(
                    f"Anchor input {name!r} holds ids and must be an integer tensor, got {value.dtype}; pass the "
                    "tokenizer's ids as they are (e.g. `return_tensors='pt'`) or convert them with `.long()`."
                )
            if value.numel():
                low, high, limit = int(value.min()), int(value.max()), limits.get(name)
                if low < 0 or (limit is not None and high >= limit):
                    allowed = f"0..{limit - 1}" if limit is not None else ">= 0"
                    raise ValueError(
                        f"Anchor input {name!r} holds ids from {low} to {high}, but the model takes ids {allowed}"
                        f"{f' ({limit} embedding rows)' if limit is not None else ''}. Tokenize with the model's own "
                        "tokenizer, or resize its embeddings (`model.resize_token_embeddings`) first."
                    )
        elif (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            raise ValueError(
                f"Anchor input {name!r} holds NaN or infinite values: the outputs recorded on them would mean "
                "nothing. Clean the data first (e.g. drop those rows or use `torch.nan_to_num`)."
            )


def check_anchors_match(inputs: dict[str, torch.Tensor], earlier: dict[str, torch.Tensor]) -> None:
    """Refuse anchors of another dtype or example shape than those remembered before (they are stored together)."""
    for name, value in inputs.items():
        if name in earlier:
            _check_like_earlier(name, value, earlier[name])


def _check_like_earlier(name: str, value: torch.Tensor, before: torch.Tensor) -> None:
    label = "positional input" if name == "_positional" else f"input {name!r}"
    if value.dtype != before.dtype:
        raise TypeError(
            f"Anchor {label} has dtype {value.dtype} but the anchors remembered before have {before.dtype}; pass the "
            f"same dtype to every `remember` call (e.g. `.to({before.dtype})`)."
        )
    fixed_shape = value.is_floating_point() and name not in SEQUENCE_FLOAT_INPUTS
    if value.dim() != before.dim() or (fixed_shape and value.shape[1:] != before.shape[1:]):
        raise ValueError(
            f"Anchor {label} has shape {tuple(value.shape[1:])} per example but the anchors remembered before have "
            f"{tuple(before.shape[1:])}; pass examples of the same shape to every `remember` call."
        )


def check_remember_budget(budget: int, old_anchors_per_task: list[int], num_new: int) -> None:
    """Refuse a new task that would leave earlier tasks less than one anchor each."""
    old_tasks = len(old_anchors_per_task)
    if old_tasks and (budget - num_new) // old_tasks < 1:
        raise ValueError(
            f"FIPConfig.anchor_budget={budget} is too small: {num_new} anchors for the new task leave "
            f"{max(budget - num_new, 0)} for {old_tasks} earlier tasks, fewer than one each. Pass num_anchors <= "
            f"{budget - old_tasks}, or raise anchor_budget to at least {old_tasks + num_new}."
        )


def anchors_to_take(num_anchors: object, task_name: object, budget: int, old_tasks: int) -> int:
    """How many anchors `remember` takes for a new task (`num_anchors`, or an equal share of `budget` among the
    `old_tasks` and the new one); refuses a `num_anchors` or `task_name` of the wrong kind, or a budget too small."""
    if task_name is not None and not isinstance(task_name, str):
        raise TypeError(f"`task_name` must be a str or None, got {type(task_name).__name__}.")
    if num_anchors is not None:
        if not is_int(num_anchors):
            raise TypeError(f"`num_anchors` must be an int or None, got {type(num_anchors).__name__}.")
        if not 1 <= num_anchors <= budget:
            raise ValueError(
                f"`num_anchors` must be between 1 and FIPConfig.anchor_budget={budget}, got {num_anchors}; raise "
                "anchor_budget or pass fewer anchors."
            )
        return num_anchors
    tasks = old_tasks + 1
    if budget // tasks < 1:
        raise ValueError(
            f"FIPConfig.anchor_budget={budget} is too small for {tasks} tasks; raise it to at least {tasks}."
        )
    return budget // tasks


def labels_to_keep(given: object, found: torch.Tensor | None, output_module: str | None) -> torch.Tensor | None:
    """The anchor labels `remember` keeps: those `found` (given, or the data's own), or none when the kept output
    is a hidden one (`output_module`), whose values are not logits; refuses labels given for such an output."""
    if output_module is None or found is None:
        return found
    if given is not None:
        raise ValueError(
            f"`labels` need the model's logits, but FIPConfig.anchor_output_module={output_module!r} keeps a hidden "
            "output: leave `labels` out, or set anchor_output_module=None."
        )
    return None  # the data's own label column is not used: the kept output is not logits


def check_same_input_names(inputs: Mapping[str, torch.Tensor], earlier: list[str]) -> None:
    """Refuse anchors whose inputs are not those of the earlier anchors (`earlier`, empty for the first task)."""
    if earlier and set(earlier) != set(inputs):
        raise ValueError(
            f"`remember` got inputs {sorted(inputs)} but earlier anchors have {sorted(earlier)}; pass the same kind "
            "of data to every call."
        )


def check_remember_adapter(tuner: FIPModel, adapter_name: object) -> None:
    """`remember` records the active adapter's function: refuse another adapter, or disabled adapters."""
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise TypeError(f"`adapter_name` must be a str or None, got {type(adapter_name).__name__}.")
    if adapter_name is not None and adapter_name in tuner.peft_config and adapter_name not in tuner.active_adapters:
        raise ValueError(
            f"`adapter_name={adapter_name!r}` is not the active adapter ({tuner.active_adapters}): `remember` records "
            f"the outputs of the function the model computes now. Call `model.set_adapter({adapter_name!r})` first."
        )
    from .layer import FIPLayer

    if any(isinstance(m, FIPLayer) and m.disable_adapters for m in tuner.model.modules()):
        raise RuntimeError(
            "`remember` was called with the adapters disabled (inside `with model.disable_adapter():` or after "
            "`disable_adapter_layers()`): the reference outputs would be the base model's, not the adapted "
            "model's. Call it with the adapters enabled."
        )


def check_finite_reference(reference) -> None:
    """Refuse reference outputs with NaN/inf (a tensor, a `distances.TopKReference`, or None when recomputed at each
    step): the model is already broken on the anchors."""
    reference = getattr(reference, "logprobs", reference)
    if reference is None:
        return
    finite = torch.isfinite(reference).flatten(1).all(dim=1) if reference.dim() > 1 else torch.isfinite(reference)
    bad = int((~finite).sum())
    if bad:
        raise ValueError(
            f"The model's outputs on {bad} of {len(finite)} anchors are NaN or infinite, so there is nothing sound "
            "to remember; nothing was stored. Check the model's weights (e.g. reload the last good adapter)."
        )


def check_saved_memory_fits(
    adapter_name: str, tensors: Mapping[str, torch.Tensor], model: nn.Module, output_module: str | None
) -> None:
    """Refuse a saved anchor memory `model` cannot use (`check_saved_memory`, then a forward pass on two of its
    anchors whose outputs must have the saved references' shape), before it is loaded. A failed load leaves the
    model as it was (`fip_peft.integrations.saving`)."""
    from .anchor_pass import reference_outputs
    from .memory import ANCHOR_PREFIX

    inputs = {k.removeprefix(ANCHOR_PREFIX): v for k, v in tensors.items() if k.startswith(ANCHOR_PREFIX)}
    if not inputs or "reference" not in tensors:
        return  # empty, or incomplete: `load_tensors` says which
    check_saved_memory(adapter_name, tensors, inputs, model)
    if any(p.device.type == "meta" for p in model.parameters()):
        return  # weights not materialized yet (low_cpu_mem_usage): nothing can run
    try:
        probe = reference_outputs(model, {k: v[:2] for k, v in inputs.items()}, output_module)
    except Exception as error:  # the model's own error says what does not fit
        raise ValueError(
            f"The saved anchors of FIP adapter {adapter_name!r} (inputs {sorted(inputs)}, shapes "
            f"{[tuple(v.shape[1:]) for v in inputs.values()]} per example) do not fit this model, which cannot "
            f"run on them ({error}). Load the adapter onto the base model it was trained on."
        ) from None
    expected = tuple(tensors["reference"].shape[1:])
    found = tuple(probe.shape[1:])
    if "reference_kind" in tensors and int(tensors["reference_kind"]) != 0:  # top-k or recomputed: positions only
        expected, found = expected[:-1], found[: len(expected) - 1]
    if found != expected:
        raise ValueError(
            f"The saved reference outputs of FIP adapter {adapter_name!r} have shape {expected} per anchor, but this "
            f"model outputs {tuple(probe.shape[1:])} on the saved anchors. Load the adapter onto the base model "
            "it was trained on."
        )


def check_saved_memory(
    adapter_name: str, tensors: Mapping[str, torch.Tensor], inputs: dict[str, torch.Tensor], model: nn.Module
) -> None:
    """Refuse a saved anchor memory (`tensors`, its anchor `inputs`) that this model cannot use, before it is loaded:
    task ids that are not integers >= 0, a distance scale that is not a finite number > 0 (0 would make every D
    infinite, a negative one would push training away from the reference outputs), NaN/inf reference outputs, and
    anchors `remember` would refuse (ids beyond this model's embeddings, NaN/inf floats, ids that are floats), and
    labels that are not class indices of the reference outputs (or -100)."""
    where = f"The saved anchor memory of FIP adapter {adapter_name!r}"
    advice = "the adapter file was altered or saved by a broken run; save the adapter again from a good model."
    task_ids = tensors.get("task_ids")
    if isinstance(task_ids, torch.Tensor) and task_ids.numel():
        integral = not (task_ids.is_complex() or task_ids.dtype == torch.bool) and (
            not task_ids.is_floating_point() or bool((torch.isfinite(task_ids) & (task_ids == task_ids.round())).all())
        )
        if not integral or float(task_ids.min()) < 0:
            raise ValueError(f"{where} has task ids that are not integers >= 0 ({task_ids.dtype}); {advice}")
    scale = tensors.get("scale")
    if isinstance(scale, torch.Tensor):
        value = float(scale.reshape(-1)[0]) if scale.numel() == 1 else math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"{where} has scale={value}; it must be a finite number > 0 (D is divided by it: 0 would make every "
                f"step's D infinite, a negative scale would push training away from the remembered outputs); {advice}"
            )
    reference = tensors.get("reference")
    if isinstance(reference, torch.Tensor) and reference.numel() and not torch.isfinite(reference).all():
        raise ValueError(f"{where} holds NaN or infinite reference outputs; {advice}")
    labels = tensors.get("labels")
    in_full = "reference_kind" not in tensors or int(tensors["reference_kind"]) == 0  # else no class count is kept
    if isinstance(labels, torch.Tensor) and labels.numel() and isinstance(reference, torch.Tensor) and in_full:
        classes = reference.shape[-1] if reference.dim() >= 2 else 0
        valid = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool) and bool(
            ((labels == -100) | ((labels >= 0) & (labels < classes))).all()
        )
        if not valid:
            raise ValueError(
                f"{where} has labels that are not class indices in [0, {classes}) or -100 ({labels.dtype}); {advice}"
            )
    try:
        check_anchor_inputs(inputs, model)
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{where} does not fit this model: {error} Load the adapter onto the base model it was trained on."
        ) from None


# ---- NaN/inf values -------------------------------------------------------------------------------------------------


def nonfinite_names(tensors: Mapping[str, object]) -> list[str]:
    """Names of the floating-point tensors in `tensors` that hold a NaN or an infinity."""
    names = [
        k for k, v in tensors.items() if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
    ]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[k]).all().cpu() for k in names]).tolist()
    return [name for name, ok in zip(names, finite, strict=True) if not ok]


def check_anchor_labels(labels: torch.Tensor, output_shape: torch.Size, task_type: object = None) -> None:
    """Refuse labels the label term cannot use: per example for per-example outputs (N, C), per token for token
    outputs (N, T, C), class indices in [0, C) or -100 (no label)."""
    classes = output_shape[-1]
    per_token = len(output_shape) == 3
    wanted = "one label per token" if per_token else "one class index per example"
    if labels.dim() != (2 if per_token else 1):
        raise ValueError(
            f"`labels` of shape {tuple(labels.shape)} do not fit the model's outputs of shape (N, "
            f"{', '.join(str(d) for d in output_shape[1:])}): give {wanted} (-100 for none), or leave them out to "
            "keep the outputs alone."
        )
    bad = labels[(labels != -100) & ((labels < 0) | (labels >= classes))]
    if bad.numel():
        raise ValueError(
            f"`labels` must be class indices in [0, {classes}) or -100 (no label), got {bad[:3].tolist()}: the model "
            f"outputs {classes} logits (is its head built for every class?)."
        )
