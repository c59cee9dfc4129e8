"""Running the anchors through a model as the functional distance sees them: in eval mode (dropout would blur how
far the function moved), reading the kept output (the model's, or that of `FIPConfig.anchor_output_module`).

Model-free helpers: they take the base model and the settings they need, so that the tuner (`fip_peft.method.model`),
the metric's gathering (`fip_peft.method.metric`) and the save checks (`fip_peft.integrations.saving`) share them
without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from ..math.distances import TopKReference, distance_scale, row_scales, scale_of_rows, top_k_reference
from .anchors import POSITIONAL, AnchorInputs, num_rows
from .memory import check_reference_size, resolve_reference_mode
from .model_io import model_output

# Anchors per forward pass when reference outputs are recorded (no grad, so larger than a step's anchor batch).
REFERENCE_BATCH_SIZE = 64
# Most bytes of outputs one such pass may produce: per-token logits over a large vocabulary take fewer anchors a pass.
REFERENCE_CHUNK_BYTES = 256 * 1024**2


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for an anchor pass, then every module's own mode back (a submodule kept in eval mode while the
    rest trains, e.g. frozen batch norm, stays in eval mode)."""
    training = [module for module in model.modules() if module.training]
    if any(type(module).train is not nn.Module.train for module in training):
        model.eval()  # a module with its own `train()` gets it called
    else:  # set the flags directly: `eval()` and nn.Module.__setattr__ cost more than a small model's anchor pass
        for module in training:
            object.__setattr__(module, "training", False)
    try:
        yield
    finally:
        for module in training:
            object.__setattr__(module, "training", True)


def anchor_outputs(
    model: nn.Module, inputs: AnchorInputs, output_module: str | None, forward: nn.Module | None = None
) -> torch.Tensor:
    """The outputs FIP keeps on `inputs`: `model`'s, or those of its submodule `output_module` (caught by a forward
    hook). Run through `forward` when given (an FSDP2 root, which gathers the shards)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    positional = inputs.pop(POSITIONAL, None)
    forward = model if forward is None else forward
    caught = []
    hook = None
    if output_module is not None:
        hook = model.get_submodule(output_module).register_forward_hook(lambda m, a, out: caught.append(out))
    try:
        outputs = forward(positional, **inputs) if positional is not None else forward(**inputs)
    finally:
        if hook is not None:
            hook.remove()
    if output_module is None:
        return model_output(outputs)
    if not caught:
        raise RuntimeError(
            f"FIPConfig.anchor_output_module={output_module!r} did not run in the model's forward pass: name a "
            "module between the inputs and the outputs, or None for the model's output."
        )
    return model_output(caught[-1])


@torch.no_grad()
def reference_outputs(
    model: nn.Module,
    inputs: AnchorInputs,
    output_module: str | None,
    reduce: Callable[[torch.Tensor], object] | None = None,
    per_anchor_bytes: int = 0,
) -> torch.Tensor | list:
    """`anchor_outputs` on all of `inputs` in eval mode, without grad, in chunks of at most `REFERENCE_BATCH_SIZE`
    anchors (fewer when each anchor's outputs take `per_anchor_bytes`, so that a chunk stays within
    `REFERENCE_CHUNK_BYTES`): float32 on the CPU, as the anchor memory keeps its references. With `reduce`, each
    chunk's outputs (on the model's device) go through it instead and the list of its results is returned, so that
    full outputs over a large vocabulary never exist for all anchors at once (top-k compression)."""
    step = max(1, min(REFERENCE_BATCH_SIZE, REFERENCE_CHUNK_BYTES // max(per_anchor_bytes, 1)))
    with eval_mode(model):
        rows = num_rows(inputs)
        chunks = []
        for start in range(0, rows, step):
            chunk = {k: v[start : start + step] for k, v in inputs.items()}
            outputs = anchor_outputs(model, chunk, output_module)
            chunks.append(outputs.float().cpu() if reduce is None else reduce(outputs))
    return torch.cat(chunks) if reduce is None else chunks


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run `model` (the tuner's base model) as the base model: every PEFT layer and `modules_to_save` wrapper with
    its adapters switched off, then as it was. Sets the layers' flag directly: PEFT's `enable_adapters` also changes
    `requires_grad`, which would unfreeze or freeze parameters in the middle of training."""
    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    if any(getattr(m, "merged", False) for m in layers):
        raise ValueError(
            "FIPConfig.reference_mode='recompute' runs the base model with the adapter disabled, but the adapter is "
            "merged into the base weights; unmerge it (`unmerge_adapter()`), or use reference_mode='top_k' or 'full'."
        )
    states = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, state in zip(layers, states, strict=True):
            m._disable_adapters = state


def check_base_function(model: nn.Module, probe: torch.Tensor, inputs: AnchorInputs, config) -> None:
    """Refuse `reference_mode="recompute"` unless `model` (whose outputs on `inputs` are `probe`) is the base model
    now (the adapter at its start, nothing trained beside it): the recomputed references are the base model's
    outputs, so they are the right ones only while remembering means remembering the base model."""
    with adapters_disabled(model):
        base = reference_outputs(model, inputs, config.anchor_output_module)
    if not torch.allclose(probe, base, rtol=1e-4, atol=1e-5):
        raise ValueError(
            "FIPConfig.reference_mode='recompute' recomputes the references from the base model with the adapter "
            "disabled, but this model's outputs already differ from the base model's (the adapter has been "
            "trained, e.g. on an earlier task, or starts away from zero), so those would be the wrong references. "
            "Use reference_mode='top_k' (with distance='kl') or 'full'; nothing was remembered."
        )


def probe_outputs(model: nn.Module, inputs: AnchorInputs, output_module: str | None) -> torch.Tensor:
    """The outputs on the first two of `inputs`, anchors given to `remember`: what they look like, and a check that
    the model runs on them (`ValueError` with the model's own error otherwise)."""
    try:
        return reference_outputs(model, {k: v[:2] for k, v in inputs.items()}, output_module)
    except Exception as error:  # the model's own error says what is wrong with the inputs
        raise ValueError(
            f"The model cannot run on the anchors given to `remember` (inputs {sorted(inputs)}): {error}"
        ) from error


@torch.no_grad()
def base_outputs(
    model: nn.Module, inputs: AnchorInputs, output_module: str | None, forward: nn.Module | None = None
) -> torch.Tensor:
    """`anchor_outputs` of the base model (adapters disabled, eval mode, no grad): the references of
    `reference_mode="recompute"`."""
    with eval_mode(model), adapters_disabled(model):
        return anchor_outputs(model, inputs, output_module, forward)


def record_references(
    model: nn.Module, inputs: AnchorInputs, config, probe: torch.Tensor, new_inputs: AnchorInputs
) -> tuple[torch.Tensor | TopKReference | None, float]:
    """The references of all anchors `inputs` kept as `config.reference_mode` resolves for outputs shaped like
    `probe` (the outputs on the first `new_inputs`): a tensor, a `TopKReference`, or None (recomputed at each step);
    and the distance scale (`distances.distance_scale`), computed chunk by chunk so that full outputs over a large
    vocabulary never exist for all anchors at once. Refuses, before any pass, references too big to keep and
    recomputed references of a model that is no longer the base model."""
    mode = resolve_reference_mode(config, probe.shape)
    check_reference_size(num_rows(inputs), probe.shape, mode, config.reference_top_k)
    if mode == "recompute":
        check_base_function(model, probe, {k: v[:2] for k, v in new_inputs.items()}, config)
    output_module, per_anchor_bytes = config.anchor_output_module, probe[0].numel() * 4
    if mode == "full":
        reference = reference_outputs(model, inputs, output_module, per_anchor_bytes=per_anchor_bytes)
        return reference, distance_scale(reference, config.distance)
    if mode == "top_k":
        k = config.reference_top_k
        chunks = reference_outputs(
            model, inputs, output_module, lambda out: top_k_reference(out, k).to("cpu"), per_anchor_bytes
        )
        return TopKReference(*(torch.cat(parts) for parts in zip(*chunks, strict=True))), 1.0  # softmax: scale-free
    if config.distance != "logits":  # recompute, softmax distance: scale-free, nothing of the base model is kept
        return None, 1.0
    with adapters_disabled(model):  # recompute, logit distance: only the scale of the base model's outputs is kept
        scales = reference_outputs(model, inputs, output_module, lambda out: row_scales(out).cpu(), per_anchor_bytes)
    return None, scale_of_rows(torch.cat(scales))
