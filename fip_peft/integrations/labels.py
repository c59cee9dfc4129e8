"""The class labels of FIP sequence-classification adapters: saved with the adapter, restored when it is loaded.

A classification adapter brings its own trained head (`modules_to_save`), sized for its classes, but PEFT saves no
label names and `AutoPeftModelForSequenceClassification` builds the base model with the base checkpoint's head
(often 2 classes, `LABEL_0`, `LABEL_1`), so loading fails with a size mismatch of the head, and a `pipeline` answers
`LABEL_1`. For FIP adapters with `task_type="SEQ_CLS"`, `install()` makes

- `save_pretrained` write `fip_labels.json` (`{"labels": [...]}`, the base model's `id2label` in class order) next
  to the adapter;
- `AutoPeftModelForSequenceClassification.from_pretrained` read it (from the folder or the Hub) and build the base
  model with those `num_labels`, `id2label` and `label2id`, unless the caller passed them.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

LABELS_FILE = "fip_labels.json"
_INSTALLED = "_fip_labels_installed"


def model_labels(model) -> list[str] | None:
    """The class names of a sequence classifier in class order (its config's `id2label`), or None."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    return [str(id2label[key]) for key in sorted(id2label, key=int)]


def label_kwargs(labels: list[str]) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that give a classifier these classes (the head comes from the adapter)."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: index for index, name in enumerate(labels)},
        "ignore_mismatched_sizes": True,
    }


def fip_adapters(model) -> dict[str, object]:
    """The configs of the FIP adapters of the `PeftModel` `model`, by name (empty for any other model)."""
    from ..method.model import FIPModel  # fip_peft.method.model imports much; labels are read without it

    if not isinstance(getattr(model, "base_model", None), FIPModel):
        return {}
    return {name: config for name, config in model.peft_config.items() if getattr(config, "peft_type", "") == "FIP"}


def _is_seq_cls(config) -> bool:
    task_type = getattr(config, "task_type", None)
    return getattr(task_type, "value", task_type) == "SEQ_CLS"


def write_labels(model, folder: str | os.PathLike) -> None:
    """Write (or update the `labels` of) `fip_labels.json` in `folder` for a FIP sequence-classification adapter."""
    configs = fip_adapters(model)
    labels = model_labels(model.get_base_model())
    if not labels or not any(_is_seq_cls(config) for config in configs.values()):
        return
    path = os.path.join(os.fspath(folder), LABELS_FILE)
    meta = read_labels_file(path) or {}
    meta["labels"] = labels
    with open(path, "w") as handle:
        handle.write(json.dumps(meta, indent=2) + "\n")


def read_labels_file(path: str | os.PathLike) -> dict[str, Any] | None:
    """The content of a `fip_labels.json`, or None when it is missing or not a JSON object with a list of labels."""
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
        return None
    return meta


def saved_labels(model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> list[str] | None:
    """The labels saved with the FIP adapter at `model_id` (a folder or a Hub id), or None."""
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(folder):
        meta = read_labels_file(os.path.join(folder, LABELS_FILE))
        return [str(v) for v in meta["labels"]] if meta else None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(os.fspath(model_id), LABELS_FILE, subfolder=subfolder, **hub_kwargs)
    except Exception:  # no labels file there (an adapter not saved by fip-peft, or offline): load as PEFT would
        return None
    meta = read_labels_file(path)
    return [str(v) for v in meta["labels"]] if meta else None


def _is_fip_adapter(model_id, subfolder, hub_kwargs) -> bool:
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
    except Exception:
        return False
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type) == "FIP" and _is_seq_cls(config)


def _wrap_auto_load(original: Callable) -> Callable:
    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from peft import AutoPeftModelForSequenceClassification

        if issubclass(cls, AutoPeftModelForSequenceClassification) and not (
            {"num_labels", "id2label", "config"} & set(kwargs)
        ):
            hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
            subfolder = kwargs.get("subfolder")
            if _is_fip_adapter(pretrained_model_name_or_path, subfolder, hub):
                labels = saved_labels(pretrained_model_name_or_path, subfolder, **hub)
                if labels:
                    kwargs = {**label_kwargs(labels), **kwargs}
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    return from_pretrained


def install() -> None:
    """Restore saved labels in `AutoPeftModelForSequenceClassification.from_pretrained` (idempotent)."""
    from peft.auto import _BaseAutoPeftModel

    if getattr(_BaseAutoPeftModel, _INSTALLED, False):
        return
    original = _BaseAutoPeftModel.__dict__["from_pretrained"].__func__
    _BaseAutoPeftModel.from_pretrained = classmethod(_wrap_auto_load(original))
    setattr(_BaseAutoPeftModel, _INSTALLED, True)
