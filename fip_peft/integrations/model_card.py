"""The model card (README.md) of FIP adapters: Hub metadata, task history, sparsity, how to load, anchor privacy.

PEFT writes a card in `PeftModel.save_pretrained` through `create_or_update_model_card` (`library_name: peft`,
`base_model`, PEFT's tags and version). For FIP adapters only, `install()` makes that method also add the tags `fip`
and `continual-learning` or `sparsification` and rewrite one FIP section of the card body, between two HTML comment
markers, so that text a user wrote elsewhere in the card survives every save. Other PEFT methods' cards are unchanged.

transformers' `push_to_hub` replaces the card that `save_pretrained` wrote with the Hub's copy (or a generic
transformers template). For FIP adapters `install()` routes `push_to_hub` through `push_fip_to_hub`, which starts
from the Hub's card when there is one, then saves (and so updates the card) and uploads.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from peft import PeftModel

from .labels import fip_adapters, model_labels

CARD_NAME = "README.md"
BEGIN = "<!-- fip-peft: begin (this section is rewritten by fip-peft on every save) -->"
END = "<!-- fip-peft: end -->"
PAPER = "https://arxiv.org/abs/2205.00334"
OBJECTIVE_TAGS = {"continual": "continual-learning", "sparsify": "sparsification"}
AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# The Hub's pipeline tag of each PEFT task type: what the adapter's model does, shown and searched on the Hub.
PIPELINE_TAGS = {
    "SEQ_CLS": "text-classification",
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
PLACEHOLDER_ID = "path/or/hub-id/of/this/adapter"
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ title }}\n"
_INSTALLED = "_fip_model_card_installed"
_REPO_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("fip_peft_repo_id", default=None)


def _base_model_id(model: PeftModel, configs: dict[str, Any]) -> str | None:
    named = [c.base_model_name_or_path for c in configs.values() if c.base_model_name_or_path]
    if named:
        return named[0]
    base = model.get_base_model()
    return getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)


def _task_type(configs: dict[str, Any]) -> str | None:
    config = next(iter(configs.values()), None)
    task_type = getattr(config, "task_type", None)
    return getattr(task_type, "value", task_type)


def is_local_path(name: str) -> bool:
    """A base model named by a folder on this machine (no Hub id): absolute, ./ or ../, ~, or an existing path."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _task_history(tuner, name: str, config) -> list[str]:
    """One row per task of the adapter's history: its name and the anchors the adapter keeps for it."""
    from ..method.accuracy import task_history

    lines = ["| # | task | anchors kept |", "| --- | --- | --- |"]
    for index, (task, anchors) in enumerate(task_history(config.task_names, tuner.memory(name).anchors_per_task())):
        lines.append(
            f"| {index} | {task} | {anchors if anchors is not None else 'none (lost: saved without anchors)'} |"
        )
    return lines


def _accuracy_section(matrix: dict) -> list[str]:
    from ..method.accuracy import AccuracyMatrix

    R = AccuracyMatrix.from_dict(matrix)
    lines = [
        "Accuracy matrix R (row i: after training task i; column j: accuracy on task j):",
        "",
        "| after \\ on | " + " | ".join(R.task_names) + " |",
        "| --- | " + " | ".join("---" for _ in R.task_names) + " |",
    ]
    for task, row in zip(R.task_names, R.matrix, strict=False):
        lines.append(f"| {task} | " + " | ".join(_cell(value) for value in row) + " |")
    lines += [
        "",
        f"ACC = {_cell(R.acc)}, BWT = {_cell(R.bwt)}, forgetting = {_cell(R.forgetting)}.",
        "",
        "- **ACC** (average accuracy): the mean of the last row, the accuracy on every task after training the last.",
        "- **BWT** (backward transfer): the mean change of each earlier task's accuracy from just after learning it "
        "to the end; negative means forgetting, 0 means none.",
        "- **forgetting**: the mean drop of each earlier task from its best accuracy to its final one.",
    ]
    return lines


def _sparsity_section(tuner, name: str) -> list[str]:
    report = getattr(tuner, "sparsity_report", None)
    if report is None:
        return []
    report = report(name)
    return [
        f"Sparsity of the adapted target weights (W + delta): {report['sparsity']:.4f} "
        f"({report['zeros']} of {report['total']} entries are exactly zero, over {len(report['layers'])} "
        f"weights; target {report['target_sparsity']}). Only target modules count.",
    ]


def _privacy_section(tuner, name: str, config) -> list[str]:
    count = len(tuner.memory(name))
    sparsify = config.objective == "sparsify"
    purpose = (
        "so that further sparsifying or training keeps the function on them"
        if sparsify
        else "so that training can continue without forgetting"
    )
    if config.save_anchors:
        memory = tuner.memory(name)
        labelled = int((memory.labels != -100).reshape(len(memory), -1).any(dim=1).sum()) if count else 0
        labels = f" and the labels of {labelled} of them" if labelled else ""
        return [
            f"This adapter stores {count} anchors in `adapter_model.safetensors`: **inputs taken from the training "
            f"data** of the tasks above, with the model's outputs on them{labels}, {purpose}. Anyone who can "
            "download the adapter can read them. Before publishing an adapter trained on private data, save it with "
            "`FIPConfig(save_anchors=False)`.",
        ]
    lost = (
        "sparsifying it further does not keep the function on the data above"
        if sparsify
        else "training it further does not preserve the tasks above"
    )
    return [
        f"This adapter was saved **without its anchors** (`save_anchors=False`; the model held {count} when it was "
        f"saved). It computes exactly the trained function, but the inputs and outputs that FIP keeps while "
        f"training are lost: {lost} unless you call `model.remember(data)` on their data again first.",
    ]


def _labels_section(labels: list[str]) -> list[str]:
    lines = ["The classes of the adapter's head (`model.config.id2label`):", "", "| id | label |", "| --- | --- |"]
    lines += [f"| {index} | {label} |" for index, label in enumerate(labels)]
    return lines


def _loading_section(model: PeftModel, configs: dict[str, Any], base_id: str | None) -> list[str]:
    task_type = _task_type(configs)
    auto = AUTO_CLASSES.get(task_type or "")
    base = model.get_base_model()
    if auto is None and type(base).__module__.startswith("transformers"):
        auto = type(base).__name__
    adapter_id = _REPO_ID.get() or PLACEHOLDER_ID
    lines = [
        "FIP is not built into PEFT: install `fip-peft` and `import fip_peft` before loading (it registers the "
        "`FIP` PEFT type). Without it, loading fails with `KeyError: 'FIP'` (PEFT does not know the "
        "`peft_type: FIP` in `adapter_config.json`).",
        "",
        "```bash",
        "pip install fip-peft",
        "```",
        "",
        "```python",
        "import fip_peft  # registers FIP with PEFT",
        "from peft import PeftModel",
    ]
    labels = model_labels(base) if task_type == "SEQ_CLS" else None
    if auto is not None and labels:  # the adapter brings a head for its own classes: build the base with them
        lines += [
            f"from transformers import {auto}",
            "",
            f"id2label = {dict(enumerate(labels))!r}",
            f"base = {auto}.from_pretrained(",
            f'    "{base_id or "<base model>"}",',
            "    id2label=id2label,",
            "    label2id={name: i for i, name in id2label.items()},",
            "    ignore_mismatched_sizes=True,  # the head comes from the adapter",
            ")",
        ]
    elif auto is not None:
        lines += [
            f"from transformers import {auto}",
            "",
            f'base = {auto}.from_pretrained("{base_id or "<base model>"}")',
        ]
    else:
        lines += ["", "base = ...  # the base model this adapter was trained on"]
    lines += [f'model = PeftModel.from_pretrained(base, "{adapter_id}")', "```", ""]
    if labels:
        lines.append(
            "`AutoPeftModelForSequenceClassification.from_pretrained(adapter)` restores the classes by itself (from "
            '`fip_labels.json`); `pipeline("text-classification", model=model, tokenizer=...)` then answers with '
            "their names."
        )
        lines.append("")
    if {c.objective for c in configs.values()} == {"sparsify"}:
        lines.append(
            "`AutoPeftModelFor...` and transformers' `model.load_adapter` also work after `import fip_peft`. "
            "`model.merge_and_unload()` gives a plain model whose adapted weights hold the exact zeros (no PEFT "
            "needed to run it)."
        )
        return lines
    lines.append(
        "`AutoPeftModelFor...` and transformers' `model.load_adapter` also work after `import fip_peft`. To continue "
        "training: `PeftModel.from_pretrained(base, ..., is_trainable=True)`, `model.remember(new_task_data)` after "
        "each task, and train with `fip_peft.FIPTrainer` or `fip_peft.create_fip_optimizer`."
    )
    return lines


def _config_rows(config) -> list[str]:
    fields = ["objective", "distance", "beta", "rank", "anchor_budget", "anchor_batch_size", "save_anchors"]
    if config.objective == "sparsify":
        fields += ["target_sparsity", "sparsity_schedule", "sparsity_ramp_steps", "sparsity_criterion"]
        fields += ["sparsity_scope"]
    target = config.target_modules
    target = sorted(target) if isinstance(target, (set, list, tuple)) else target
    rows = ["| setting | value |", "| --- | --- |", f"| target_modules | `{target}` |"]
    rows += [f"| {key} | `{getattr(config, key, None)}` |" for key in fields if hasattr(config, key)]
    return rows


def fip_card_section(model: PeftModel) -> str:
    """The FIP section of the card of `model` (markers included): what the adapter is, how to load it, its task
    history (anchors per task and the accuracy matrix when recorded), sparsity, anchor privacy, settings."""
    configs = fip_adapters(model)
    tuner = model.base_model
    base_id = _base_model_id(model, configs)
    objectives = sorted({config.objective for config in configs.values()})
    lines = [
        BEGIN,
        f"This is a [FIP]({PAPER}) (functionally invariant paths) adapter for "
        f"{f'`{base_id}`' if base_id else 'its base model'}, made with "
        "[fip-peft](https://pypi.org/project/fip-peft/): "
        + (
            "a weight displacement trained to learn new tasks while the outputs on earlier tasks stay put."
            if objectives == ["continual"]
            else "a weight displacement that walks the weights toward sparsity while the outputs on the remembered "
            "inputs stay put."
            if objectives == ["sparsify"]
            else "weight displacements for continual learning and sparsification."
        ),
        "",
        "## How to load",
        "",
        *_loading_section(model, configs, base_id),
    ]
    labels = model_labels(model.get_base_model()) if _task_type(configs) == "SEQ_CLS" else None
    if labels:
        lines += ["", "## Labels", "", *_labels_section(labels)]
    several = len(configs) > 1
    for name, config in configs.items():
        heading = f" (adapter `{name}`)" if several else ""
        history = "Remembered data" if config.objective == "sparsify" else "Task history"
        lines += ["", f"## {history}{heading}", ""]
        lines += _task_history(tuner, name, config) if config.task_names or len(tuner.memory(name)) else []
        if not config.task_names and not len(tuner.memory(name)):
            lines.append("No task remembered yet (`model.remember(data, task_name=...)` adds one).")
        if config.accuracy_matrix:
            lines += ["", *_accuracy_section(config.accuracy_matrix)]
        if config.objective == "sparsify":
            sparsity = _sparsity_section(tuner, name)
            if sparsity:
                lines += ["", f"## Sparsity{heading}", "", *sparsity]
        lines += ["", f"## Anchors and privacy{heading}", "", *_privacy_section(tuner, name, config)]
        lines += ["", f"## FIP settings{heading}", "", *_config_rows(config)]
    lines.append(END)
    return "\n".join(lines)


def _replace_section(text: str, section: str) -> str:
    """`text` with its FIP section replaced by `section`, or `section` inserted after the first heading."""
    if BEGIN in text and END in text:
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        return text[:start] + section + text[stop:]
    lines = text.splitlines()
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
    return "\n".join([*lines[:at], "", section, "", *lines[at:]])


def update_fip_card(model: PeftModel, output_dir: str | os.PathLike) -> None:
    """Add FIP's metadata and section to the card in `output_dir` (written by PEFT just before)."""
    configs = fip_adapters(model)
    path = os.path.join(os.fspath(output_dir), CARD_NAME)
    card = ModelCard.load(path)
    tags = set(card.data.tags or []) | {"fip"} | {OBJECTIVE_TAGS[c.objective] for c in configs.values()}
    card.data.tags = sorted(tags)
    card.data.library_name = "peft"
    base_id = _base_model_id(model, configs)
    # The Hub only takes Hub ids; a folder of this machine (which PEFT writes, with a `base_model:adapter:` tag, when
    # the base was loaded from one) means nothing there. A Hub id set on the adapter (`base_model_name_or_path`,
    # `fip-peft --base-model-id`) takes its place.
    current = card.data.base_model
    if isinstance(current, str) and is_local_path(current):
        card.data.base_model = None
    card.data.tags = [
        t for t in card.data.tags if not (t.startswith("base_model:") and is_local_path(t.split(":")[-1]))
    ]
    if base_id and not is_local_path(base_id) and not card.data.base_model:
        card.data.base_model = base_id
        card.data.tags = sorted({*card.data.tags, f"base_model:adapter:{base_id}"})
    pipeline_tag = PIPELINE_TAGS.get(_task_type(configs) or "")
    if pipeline_tag and not card.data.pipeline_tag:
        card.data.pipeline_tag = pipeline_tag
    card.text = _replace_section(card.text, fip_card_section(model))
    card.save(path)


def _wrap_card(original: Callable) -> Callable:
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        if not fip_adapters(self):
            return original(self, output_dir)
        path = os.path.join(output_dir, CARD_NAME)
        if not os.path.exists(path):  # a short card instead of PEFT's long template full of placeholders
            base_id = _base_model_id(self, fip_adapters(self))
            title = f"# FIP adapter for {base_id}" if base_id else "# FIP adapter"
            ModelCard.from_template(ModelCardData(), template_str=CARD_TEMPLATE, title=title).save(path)
        original(self, output_dir)
        update_fip_card(self, output_dir)

    return create_or_update_model_card


def _remote_card(repo_id: str, token) -> ModelCard | None:
    try:
        return ModelCard.load(repo_id, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None


def push_fip_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **save_kwargs: Any,
):
    """Save `model`'s adapters with their card into a temporary folder and upload it as one commit to `repo_id`
    (transformers' `push_to_hub` steps, keeping the card that `save_pretrained` writes). An existing card on the Hub
    is the starting point: only its FIP section and metadata are updated."""
    from transformers.utils.hub import hf_api

    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        remote = _remote_card(repo_id, token)
        if remote is not None:
            remote.save(os.path.join(folder, CARD_NAME))
        reset = _REPO_ID.set(repo_id)
        try:
            model.save_pretrained(folder, **save_kwargs)
        finally:
            _REPO_ID.reset(reset)
        if tags:
            card = ModelCard.load(os.path.join(folder, CARD_NAME))
            card.data.tags = sorted(set(card.data.tags or []) | set(tags))
            card.save(os.path.join(folder, CARD_NAME))
        return model._upload_modified_files(
            folder,
            repo_id,
            files_timestamps={},
            commit_message=commit_message or "Upload FIP adapter",
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )


def _wrap_push(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def push_to_hub(self, *args, **kwargs):
        if not fip_adapters(self):
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        bound.pop("self")
        bound.pop("max_shard_size", None)  # adapters are small: PEFT saves one safetensors file
        extra = bound.pop("kwargs", {})
        return push_fip_to_hub(self, **bound, **extra)

    return push_to_hub


def install() -> None:
    """Give FIP adapters their card on `save_pretrained` and `push_to_hub` (idempotent); other methods unchanged."""
    if getattr(PeftModel, _INSTALLED, False):
        return
    PeftModel.create_or_update_model_card = _wrap_card(PeftModel.create_or_update_model_card)
    PeftModel.push_to_hub = _wrap_push(PeftModel.push_to_hub)
    setattr(PeftModel, _INSTALLED, True)
