"""Safe saving and checked loading of FIP adapters: the PEFT glue around `PeftModel.save_pretrained`/`from_pretrained`.

peft writes adapter files straight into the target folder, so a crash in the middle of a write leaves a broken
adapter where a good one was. For FIP adapters (and only for them: other PEFT methods go through peft's methods
unchanged) `install()` makes

- `save_pretrained` refuse adapter weights or anchor memory holding NaN/inf, then write everything into a temporary
  sibling folder and move each file into place with `os.replace` (atomic on POSIX and Windows), so that the previous
  adapter stays intact and loadable until the new files are complete;
- `save_pretrained` of a sequence classifier also write its class labels (`fip_labels.json`, see `labels`);
- `from_pretrained`/`load_adapter` of a local FIP adapter folder check that `adapter_model.safetensors` is a complete
  safetensors file before the model is touched, and turn safetensors' header errors into one clear error naming the
  file.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable

from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from .checks import nonfinite_names
from .labels import LABELS_FILE, write_labels

MODEL_CARD_NAME = "README.md"
_INSTALLED = "_fip_saving_installed"


def _holds_fip(model: PeftModel) -> bool:
    from .model import FIPModel

    return isinstance(getattr(model, "base_model", None), FIPModel)


def check_finite_adapters(model: PeftModel, adapter_names: list[str], state_dict: dict | None = None) -> None:
    """Refuse to save adapters whose weights or anchor memory hold NaN/inf (`ValueError` naming the tensors)."""
    for name in adapter_names:
        tensors = get_peft_model_state_dict(
            model, state_dict=state_dict, adapter_name=name, save_embedding_layers=False
        )
        bad = nonfinite_names(tensors)
        if bad:
            raise ValueError(
                f"Refusing to save FIP adapter {name!r}: {len(bad)} tensors hold NaN or infinite values (e.g. "
                f"{', '.join(bad[:3])}). Nothing was written. Reload the last good adapter and train again with a "
                "lower learning rate; FIPConfig(on_nonfinite='skip') keeps NaN steps out of training."
            )


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _move_into(source: str, target: str) -> None:
    """Move every file under `source` to the same place under `target` with `os.replace`, configs last (so that a
    config never describes weights that are not there yet)."""
    files = []
    for root, _, names in os.walk(source):
        for name in names:
            path = os.path.join(root, name)
            _fsync(path)
            files.append(os.path.relpath(path, source))
    files.sort(key=lambda rel: (os.path.basename(rel) == CONFIG_NAME, rel))
    for rel in files:
        destination = os.path.join(target, rel)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.replace(os.path.join(source, rel), destination)


def atomic_save(save: Callable[[str], None], save_directory: str | os.PathLike) -> None:
    """Run `save(folder)` into a temporary sibling of `save_directory`, then move its files into `save_directory`.

    A failure inside `save` leaves `save_directory` as it was; the temporary folder is removed either way.
    """
    target = os.path.realpath(os.fspath(save_directory))  # the staging folder must be on the target's filesystem
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    try:
        for name in (MODEL_CARD_NAME, LABELS_FILE):  # updated rather than replaced: keep what was there
            if os.path.isfile(os.path.join(target, name)):
                shutil.copy2(os.path.join(target, name), os.path.join(staging, name))
        save(staging)
        os.makedirs(target, exist_ok=True)
        _move_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_saved_adapter(model_id: str | os.PathLike, subfolder: str | None = None) -> None:
    """If `model_id` is a local FIP adapter folder, check that its safetensors file is complete (header and size)."""
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path) as handle:
            peft_type = json.load(handle).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return  # peft reports an unreadable config itself
    weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if peft_type != "FIP" or not os.path.isfile(weights):
        return
    try:
        with safe_open(weights, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise _corrupted(weights, error) from None


def _corrupted(path: str, error: Exception) -> ValueError:
    return ValueError(
        f"The FIP adapter file {path} is corrupted or truncated ({error}); the model was not changed. Save the "
        "adapter again, or download it again (e.g. `force_download=True`)."
    )


def _argument(signature: inspect.Signature, args: tuple, kwargs: dict, name: str) -> object:
    bound = signature.bind_partial(*args, **kwargs).arguments
    if name in bound:
        return bound[name]
    extra = bound.get("kwargs", {})
    if name in extra:
        return extra[name]
    parameter = signature.parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _wrap_save(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        if not _holds_fip(self):
            return original(self, *args, **kwargs)
        directory = _argument(signature, (self, *args), kwargs, "save_directory")
        selected = _argument(signature, (self, *args), kwargs, "selected_adapters")
        names = list(self.peft_config) if selected is None else [n for n in selected if n in self.peft_config]
        if not _argument(signature, (self, *args), kwargs, "is_main_process") or os.path.isfile(os.fspath(directory)):
            return original(self, *args, **kwargs)
        check_finite_adapters(self, names, _argument(signature, (self, *args), kwargs, "state_dict"))
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["save_directory"] = None

        def save(folder: str) -> None:
            bound.arguments["save_directory"] = folder
            original(*bound.args, **bound.kwargs)
            write_labels(self, folder)

        atomic_save(save, directory)

    return save_pretrained


def _wrap_load(original: Callable, model_id_name: str) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load(*args, **kwargs):
        model_id = _argument(signature, args, kwargs, model_id_name)
        check_saved_adapter(model_id, _argument(signature, args, kwargs, "subfolder"))
        return original(*args, **kwargs)

    return load


def install() -> None:
    """Route FIP adapters' saving and loading through the checks above (idempotent); other methods are unaffected."""
    if getattr(PeftModel, _INSTALLED, False):
        return
    PeftModel.save_pretrained = _wrap_save(PeftModel.save_pretrained)
    PeftModel.load_adapter = _wrap_load(PeftModel.load_adapter, "model_id")
    from_pretrained = PeftModel.__dict__["from_pretrained"].__func__
    PeftModel.from_pretrained = classmethod(_wrap_load(from_pretrained, "model_id"))
    setattr(PeftModel, _INSTALLED, True)
