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
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn

from ..method.anchor_pass import reference_outputs
from ..method.checks import nonfinite_names
from ..method.step_guard import GUARDED_MODELS
from ..optimizers.distributed import DTensor
from .labels import LABELS_FILE, write_labels

MODEL_CARD_NAME = "README.md"
# Remembered anchors whose outputs `save_pretrained` checks before writing.
ANCHOR_CHECK_ROWS = 8
# A staging folder without an owner in its name (an older fip_peft's) untouched this long is from a killed save.
STALE_STAGING_SECONDS = 3600
_INSTALLED = "_fip_saving_installed"


def _holds_fip(model: PeftModel) -> bool:
    from ..method.model import FIPModel

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


def check_anchor_outputs(model: PeftModel, adapter_names: list[str]) -> None:
    """Refuse to save an active adapter whose outputs on its first `ANCHOR_CHECK_ROWS` remembered anchors are NaN or
    infinite (`ValueError`): weights can be finite and still have diverged (say up to 1e12), and such an adapter is
    useless on the very inputs it was meant to keep. Adapters that are not active (the model does not compute them
    now) and FSDP2-sharded models (a forward pass on the saving process alone would wait for the others) are not
    checked."""
    tuner = model.base_model
    names = [n for n in adapter_names if n in tuner.active_adapters and n in tuner.fip_memory]
    if not names or any(isinstance(p, DTensor) for p in tuner.parameters()):
        return
    for name in names:
        memory = tuner.fip_memory[name]
        if not len(memory):
            continue
        inputs, _ = memory.batch(torch.arange(min(len(memory), ANCHOR_CHECK_ROWS)))
        outputs = reference_outputs(tuner.model, inputs, tuner.peft_config[name].anchor_output_module)
        finite = torch.isfinite(outputs.flatten(1) if outputs.dim() > 1 else outputs.unsqueeze(1)).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(
                f"Refusing to save FIP adapter {name!r}: its outputs on {int((~finite).sum())} of the first "
                f"{len(finite)} remembered anchors are NaN or infinite, so the training has diverged (its weights are "
                "finite but too large). Nothing was written. Reload the last good adapter and train again with a "
                "lower learning rate."
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user (PermissionError), or no signals on this platform
        return True
    return True


def clean_stale_staging(target: str) -> list[str]:
    """Remove the staging folders that killed saves left beside `target` (a killed process never runs its cleanup):
    those made on this host by a process that no longer runs, whichever folder they were saving (a `Trainer`
    checkpoint killed midway leaves one for a `checkpoint-N` that may never be saved again), and those of older
    fip_peft versions (no owner in the name) for `target` itself, untouched for `STALE_STAGING_SECONDS`. A staging
    folder of a live save, or one made on another host (a shared filesystem), is left alone. Returns the removed
    paths."""
    parent, base = os.path.dirname(target), os.path.basename(target)
    owned = re.compile(rf"\.(.+)\.{re.escape(socket.gethostname())}-(\d+)\.[a-z0-9_]+\.tmp")
    legacy = re.compile(rf"\.{re.escape(base)}\.[a-z0-9_]+\.tmp")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if (match := owned.fullmatch(name)) is not None:
            stale = not _process_alive(int(match.group(2)))
        elif legacy.fullmatch(name) is not None:
            try:
                stale = time.time() - os.stat(path).st_mtime > STALE_STAGING_SECONDS
            except OSError:
                continue
        else:
            continue
        if stale and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def atomic_save(save: Callable[[str], None], save_directory: str | os.PathLike) -> None:
    """Run `save(folder)` into a temporary sibling of `save_directory`, then move its files into `save_directory`.

    A failure inside `save` leaves `save_directory` as it was; the temporary folder is removed either way. Staging
    folders that earlier, killed saves of `save_directory` left are removed first (`clean_stale_staging`).
    """
    target = os.path.realpath(os.fspath(save_directory))  # the staging folder must be on the target's filesystem
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    clean_stale_staging(target)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.{owner}.", suffix=".tmp", dir=parent)
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
            config = json.load(handle)
        peft_type = config.get("peft_type")
    except (OSError, ValueError, AttributeError):
        return  # peft reports an unreadable config itself
    weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if peft_type != "FIP" or not os.path.isfile(weights):
        return
    try:
        with safe_open(weights, framework="pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise _corrupted(weights, error) from None
    _check_weights_match_config(folder, config.get("rank"), shapes)


def _check_weights_match_config(folder: str, rank: object, shapes: dict[str, list[int]]) -> None:
    """Refuse an adapter folder whose weights do not have the layout its config describes (full-rank `fip_delta`
    for `rank=None`, `fip_A`/`fip_B` of that rank otherwise): the weights and the config of two different saves, as a
    save killed between moving the weights and the config would leave, or files mixed by hand. peft would load such
    a pair with only a "missing keys" warning, leaving the adapter at its initial weights."""
    full = [key for key in shapes if ".fip_delta" in key]
    low = {key: shape for key, shape in shapes.items() if ".fip_A" in key or ".fip_B" in key}
    if rank is None:
        wrong = sorted(low)
    else:
        wrong = full + [key for key, shape in low.items() if ".fip_A" in key and shape and shape[0] != rank]
    if wrong:
        described = "full-rank (rank=None)" if rank is None else f"rank={rank}"
        raise ValueError(
            f"The FIP adapter in {folder} has weights that do not match its adapter_config.json ({described}), e.g. "
            f"{wrong[0]} of shape {tuple(shapes[wrong[0]])}: the weights and the config come from two different "
            "saves (a save killed between moving them, or files mixed by hand); the model was not changed. Save the "
            "adapter again."
        )


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
        state_dict = _argument(signature, (self, *args), kwargs, "state_dict")
        check_finite_adapters(self, names, state_dict)
        if state_dict is None:  # a given state dict need not be what the model computes now
            check_anchor_outputs(self, names)
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["save_directory"] = None

        def save(folder: str) -> None:
            bound.arguments["save_directory"] = folder
            original(*bound.args, **bound.kwargs)
            write_labels(self, folder)

        atomic_save(save, directory)

    return save_pretrained


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs")


def _undo_injection(model: nn.Module) -> Callable[[], None]:
    """What puts `model` back as it is now after `PeftModel.from_pretrained` injected an adapter into it and failed
    (a size mismatch, saved anchors that do not fit): every submodule back in its place (the FIP layers and
    `modules_to_save` wrappers dropped), every parameter's `requires_grad` and every module's mode as now, and the
    attributes and forward hooks peft and FIP added to the model removed."""
    children = [(module, dict(module._modules)) for module in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    attributes = set(model.__dict__)
    hooks = {name: dict(getattr(model, name, {})) for name in _HOOK_DICTS}

    def undo() -> None:
        for module, modules in children:
            module._modules.clear()
            module._modules.update(modules)
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, training in modes:
            object.__setattr__(module, "training", training)
        for name in set(model.__dict__) - attributes:
            del model.__dict__[name]
        for name, kept in hooks.items():
            current = getattr(model, name, None)
            if current is not None:
                for key in set(current) - set(kept):
                    del current[key]
        for tuner in list(GUARDED_MODELS):
            if tuner.model is model:
                GUARDED_MODELS.discard(tuner)

    return undo


def _undo_new_adapter(model: PeftModel, adapter_name: object) -> Callable[[], None] | None:
    """What removes `adapter_name` again after `load_adapter` added it and failed, and puts back every parameter's
    `requires_grad`; None when the adapter existed before (peft then refuses before adding anything)."""
    if not isinstance(adapter_name, str) or adapter_name in getattr(model, "peft_config", {}):
        return None
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def undo() -> None:
        if adapter_name in model.peft_config:
            model.delete_adapter(adapter_name)
        for p, flag in flags:
            p.requires_grad_(flag)

    return undo


def _wrap_load(original: Callable, model_id_name: str, target_name: str) -> Callable:
    """`original` (peft's `from_pretrained` or `load_adapter`) with the adapter file checked first, and the model
    (`target_name`: the base model given to `from_pretrained`, or the `PeftModel` whose `load_adapter` runs) put back
    as it was when loading a FIP adapter fails after it began changing it."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load(*args, **kwargs):
        model_id = _argument(signature, args, kwargs, model_id_name)
        subfolder = _argument(signature, args, kwargs, "subfolder")
        check_saved_adapter(model_id, subfolder)
        target = _argument(signature, args, kwargs, target_name)
        undo = None
        if _is_local_fip_adapter(model_id, subfolder) and isinstance(target, nn.Module):
            if target_name == "self":
                undo = _undo_new_adapter(target, _argument(signature, args, kwargs, "adapter_name"))
            else:
                undo = _undo_injection(target)
        try:
            return original(*args, **kwargs)
        except BaseException:
            if undo is not None:
                undo()
            raise

    return load


def _is_local_fip_adapter(model_id: object, subfolder: object) -> bool:
    if not isinstance(model_id, (str, os.PathLike)):
        return False
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    try:
        with open(os.path.join(folder, CONFIG_NAME)) as handle:
            return json.load(handle).get("peft_type") == "FIP"
    except (OSError, ValueError, AttributeError):
        return False


def install() -> None:
    """Route FIP adapters' saving and loading through the checks above (idempotent); other methods are unaffected."""
    if getattr(PeftModel, _INSTALLED, False):
        return
    PeftModel.save_pretrained = _wrap_save(PeftModel.save_pretrained)
    PeftModel.load_adapter = _wrap_load(PeftModel.load_adapter, "model_id", "self")
    from_pretrained = PeftModel.__dict__["from_pretrained"].__func__
    PeftModel.from_pretrained = classmethod(_wrap_load(from_pretrained, "model_id", "model"))
    setattr(PeftModel, _INSTALLED, True)
