"""What goes into and comes out of a model: its keyword inputs and the output tensor FIP preserves."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def forward_input_names(model: nn.Module) -> set[str]:
    """The keyword inputs `model.forward` accepts; with `**kwargs`, its named ones and the usual HF inputs."""
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        named = {p.name for p in params if p.kind != inspect.Parameter.VAR_KEYWORD}
        return named | {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "inputs_embeds"}
    return {p.name for p in params}


def model_output(outputs: object) -> torch.Tensor:
    """The tensor FIP preserves: `logits` when present, else the last hidden state, else the first output."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for name in ("logits", "last_hidden_state"):
        value = getattr(outputs, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, dict):
        outputs = tuple(outputs.values())
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"FIP cannot find an output tensor in a model output of type {type(outputs).__name__}.")


def loss_uses_num_items(model) -> bool:
    """Whether the model's own loss divides by the `num_items_in_batch` that `Trainer` passes to models whose
    `forward` takes `**kwargs` (transformers' losses do, through `self.loss_function`; classification heads that build
    `CrossEntropyLoss()` themselves do not)."""
    from transformers.trainer_utils import unwrap_peft_model

    try:
        source = inspect.getsource(type(unwrap_peft_model(model)).forward)
    except (OSError, TypeError):
        return True
    return "loss_function" in source or "num_items_in_batch" in source
