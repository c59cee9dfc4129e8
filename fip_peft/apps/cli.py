"""`fip-peft`: the common FIP jobs on text classification without writing Python.

    fip-peft train    --model M --task a.csv --task b.csv --output-dir out   # learn tasks in turn, remember each
    fip-peft sparsify --model M --task a.csv --target-sparsity 0.5 --output-dir out
    fip-peft eval     --adapter out --task a.csv --task b.csv               # accuracy of adapters on tasks
    fip-peft info     out                                                   # config, tasks, anchors, sparsity

Task files are csv, json/jsonl or parquet, read with `datasets.load_dataset`; one text column and one label column.
Every file and column is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cli_inputs import (
    ADAPTER_WEIGHTS,
    LABELS_FILE,
    CLIError,
    TaskData,
    base_model_hub_id,
    check_model,
    check_training_args,
    config_error,
    load_task_files,
    model_not_found,
    read_adapter,
)
from .cli_parser import build_parser

__all__ = ["CLIError", "TaskData", "build_parser", "load_task_files", "main", "read_adapter"]
AFTER_TASK = "after-task-{}"
MERGED = "merged"
LEARNING_RATE = {"continual": 1e-4, "sparsify": 1e-3}


# ---- task files and evaluation --------------------------------------------------------------------------------------


def label_names(tasks: list[TaskData], label_column: str) -> list[str]:
    """The classes of all tasks in order of first appearance (sorted within a task): one shared head covers them."""
    labels: list[str] = []
    for task in tasks:
        for value in sorted({str(v) for v in task.train[label_column]} | _test_labels(task, label_column)):
            if value not in labels:
                labels.append(value)
    return labels


def _test_labels(task: TaskData, label_column: str) -> set[str]:
    return {str(v) for v in task.test[label_column]} if task.test is not None else set()


def tokenize(data, tokenizer, text_column: str, label_column: str, label2id: dict[str, int], max_length: int):
    """Token ids and attention mask of the text column, and `labels` as class ids of the shared head."""
    unknown = sorted({str(v) for v in data[label_column]} - set(label2id))
    if unknown:
        raise CLIError(f"labels {unknown[:5]} are not classes of this adapter ({sorted(label2id)}).")
    return data.map(
        lambda batch: {
            **tokenizer(batch[text_column], truncation=True, max_length=max_length, return_token_type_ids=False),
            "labels": [label2id[str(v)] for v in batch[label_column]],
        },
        batched=True,
        remove_columns=data.column_names,
        desc="Tokenizing",
    )


class _Rows:
    """A torch-style view of a tokenized dataset, batched by a padding collator."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.data[index]


def accuracy_row(model, tests: list, tokenizer, batch_size: int, progress: bool = True) -> list[float]:
    from transformers import DataCollatorWithPadding

    from .evaluation import evaluate_tasks

    return evaluate_tasks(
        model,
        [_Rows(t) for t in tests],
        batch_size=batch_size,
        collate_fn=DataCollatorWithPadding(tokenizer),
        progress=progress,
    )


# ---- train and sparsify ---------------------------------------------------------------------------------------------


def _quiet_libraries(quiet: bool) -> None:
    """Hide library warnings that do not concern the user of the command line; with --quiet also every progress bar
    (datasets, the Hub, transformers' loading)."""
    import warnings

    # peft probes `model.is_gradient_checkpointing`, which transformers has renamed
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not quiet:
        return
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    datasets.disable_progress_bars()
    disable_progress_bars()
    logging.disable_progress_bar()


def load_classifier(name: str, flag: str, labels: list[str] | None):
    """`AutoModelForSequenceClassification` of `name` with a head for `labels` (the adapter supplies the trained one).
    transformers' load report (the head it starts afresh, the pooler the checkpoint lacks) is not shown: the command
    trains or loads those parts itself."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from ..integrations.labels import label_kwargs

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(name, **(label_kwargs(labels) if labels else {}))
    except OSError as error:
        raise model_not_found(name, flag, error) from None
    finally:
        logging.set_verbosity(verbosity)


def _load_tokenizer(name: str, flag: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise model_not_found(name, flag, error) from None


def untrained_pooler(model) -> str | None:
    """Name of a BERT-style pooler (`<name>.pooler`, a square `dense` Linear) whose bias is all zero: never trained.

    `AutoModelForSequenceClassification` reads the CLS state through this pooler. Sentence-embedding checkpoints such
    as all-MiniLM-L6-v2 pool by mean and never train it: its weights stay at a small init and its bias at exactly 0,
    so its output varies ~5x less across inputs than the CLS state itself (docs/benchmarks.md).
    """
    from torch import nn

    for name, module in model.named_modules():
        dense = getattr(module, "dense", None)
        if name.split(".")[-1] != "pooler" or not isinstance(dense, nn.Linear) or dense.bias is None:
            continue
        if dense.in_features == dense.out_features and not dense.bias.detach().any():
            return name
    return None


def train_pooler_as_new(model, pooler: str) -> None:
    """Start the trained copy of an untrained pooler (PEFT `modules_to_save`) as a pass-through: identity weights,
    zero bias, so that the head reads tanh(CLS state) at the state's own scale. The base model's pooler is kept."""
    import torch

    dense = model.get_base_model().get_submodule(pooler).modules_to_save[model.active_adapter].dense
    with torch.no_grad():
        dense.weight.copy_(torch.eye(dense.out_features, dtype=dense.weight.dtype))
        dense.bias.zero_()


def _steps_of(args: argparse.Namespace, rows: int) -> int:
    """Optimizer steps of one task of `rows` training rows."""
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(math.ceil(rows / args.per_device_train_batch_size) * args.epochs))


def _fip_config(args: argparse.Namespace, first_task_rows: int):
    from ..method.config import FIPConfig

    kwargs = {
        "task_type": "SEQ_CLS",
        "objective": args.objective,
        "rank": args.rank,
        "anchor_budget": args.anchor_budget,
        "save_anchors": not args.no_save_anchors,
        "distance": args.distance,
    }
    if args.beta is not None:
        kwargs["beta"] = args.beta
    if args.objective == "sparsify":
        ramp = args.sparsity_ramp_steps
        if ramp is None:  # half of the first task's steps: the second half repairs the last prunings
            ramp = max(1, _steps_of(args, first_task_rows) // 2)
        kwargs.update(target_sparsity=args.target_sparsity, sparsity_ramp_steps=ramp)
        for name in ("sparsity_criterion", "sparsity_scope", "sparsity_schedule"):  # unset: the measured recipe
            if getattr(args, name) is not None:
                kwargs[name] = getattr(args, name)
    try:
        return FIPConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise config_error(error) from error


def _default_learning_rate(args: argparse.Namespace, first_task_rows: int) -> float:
    """Sparsify's default learning rate: the one measured with the recipe of the target sparsity and the ramp."""
    from ..math.sparsity import recommended_recipe

    target = 0.5 if args.target_sparsity is None else args.target_sparsity  # --sparsity-scope 2:4
    ramp = args.sparsity_ramp_steps
    if ramp is None:  # as `_fip_config` sets it
        ramp = max(1, _steps_of(args, first_task_rows) // 2)
    recipe = recommended_recipe(target, args.sparsity_criterion, args.sparsity_scope, args.sparsity_schedule, ramp)
    return recipe.learning_rate


def _resume_source(args: argparse.Namespace) -> dict[str, Any] | None:
    """The adapter `train --adapter` continues from (a folder, or a Hub id fetched into the cache), checked."""
    if args.adapter is None:
        return None
    folder = Path(args.adapter)
    if not folder.exists():
        from .cli_inputs import looks_like_a_path

        if looks_like_a_path(args.adapter):
            raise CLIError(f"--adapter {args.adapter}: no such folder; give an adapter folder or a Hub id.")
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(args.adapter))
        except Exception as error:
            raise CLIError(f"--adapter {args.adapter}: not a folder, and not found on the Hub ({error}).") from None
    prior = read_adapter(str(folder), "--adapter")
    if prior["meta"] is None:
        raise CLIError(
            f"--adapter {args.adapter}: no {LABELS_FILE} with the classes of its head; continue from an adapter "
            "saved by `fip-peft train` (or a FIP sequence classifier saved with fip-peft's save_pretrained)."
        )
    return prior


def _resume_labels(prior: dict[str, Any], labels: list[str], args: argparse.Namespace) -> list[str]:
    known = [str(v) for v in prior["meta"]["labels"]]
    new = [label for label in labels if label not in known]
    if new:
        raise CLIError(
            f"--adapter {args.adapter}: its head knows {known}, and the task files add {new[:5]}: a continued adapter "
            "keeps its classes (the remembered outputs are over them). Train a new adapter on all the tasks instead."
        )
    if args.objective != prior["config"].get("objective", "continual"):
        raise CLIError(
            f"--adapter {args.adapter} has objective {prior['config'].get('objective')!r}; continue it with the same "
            "command (train for continual, sparsify for sparsify)."
        )
    return known


def _build_model(args: argparse.Namespace, tasks: list[TaskData], labels: list[str], prior: dict | None):
    """The PEFT model to train: a new FIP adapter on `--model`, or the `--adapter` to continue, trainable."""
    from peft import PeftModel, get_peft_model
    from transformers.utils import logging

    if prior is not None:
        base = load_classifier(args.model, "--model", labels)
        return PeftModel.from_pretrained(base, prior["folder"], is_trainable=True)
    config = _fip_config(args, len(tasks[0].train))
    base = load_classifier(args.model, "--model", labels)
    pooler = untrained_pooler(base) if args.pooler == "auto" and args.objective == "continual" else None
    if pooler is not None:  # a new module like the head: trained in full and saved with the adapter
        logging.get_logger(__name__).warning(
            f"{args.model}: the pooler {pooler!r} was never trained (bias all zero); training it in full from a "
            "pass-through start and saving it with the adapter (--pooler keep leaves it as it is)."
        )
        config = replace(config, modules_to_save=[pooler], exclude_modules=[f"{pooler}.dense"])
    model = get_peft_model(base, config)
    if pooler is not None:
        train_pooler_as_new(model, pooler)
    return model


def run_train(args: argparse.Namespace) -> int:
    """Learn the task files in turn with one FIP adapter, evaluating every task after each; save the adapter after
    each task and at the end."""
    default_rate = args.learning_rate is None
    if default_rate:  # sparsify's is set once the first task's steps are known (below)
        args.learning_rate = LEARNING_RATE[args.objective]
    check_training_args(args)
    prior = _resume_source(args)
    if args.model is None:
        if prior is None:
            raise CLIError("give --model (the base model), or --adapter to continue from an adapter.")
        args.model = _base_name(prior, None)
    tasks = load_task_files(
        args.task, args.text_column, args.label_column, args.test_fraction, args.seed, quiet=args.quiet
    )
    if default_rate and args.objective == "sparsify":
        args.learning_rate = _default_learning_rate(args, len(tasks[0].train))
    check_model(args.model, "--model")
    check_model(args.tokenizer, "--tokenizer")
    labels = label_names(tasks, args.label_column)
    if prior is not None:
        labels = _resume_labels(prior, labels, args)
    else:
        _fip_config(args, len(tasks[0].train))  # every setting checked before a model is loaded
    _quiet_libraries(args.quiet)

    from tqdm.auto import tqdm
    from transformers import AutoConfig, DataCollatorWithPadding, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    from ..integrations.trainer import FIPTrainer
    from ..method.accuracy import AccuracyMatrix

    set_seed(args.seed)
    if prior is None:
        try:
            model_labels = dict(AutoConfig.from_pretrained(args.model).label2id or {})
        except OSError as error:
            raise model_not_found(args.model, "--model", error) from None
        if set(labels) <= set(model_labels):  # a classifier that already knows these classes keeps its head
            labels = sorted(model_labels, key=model_labels.get)
    label2id = {name: index for index, name in enumerate(labels)}
    tokenizer = _load_tokenizer(args.tokenizer or (str(prior["folder"]) if prior else args.model), "--tokenizer")
    model = _build_model(args, tasks, labels, prior)
    encode = {"tokenizer": tokenizer, "text_column": args.text_column, "label_column": args.label_column}
    encode.update(label2id=label2id, max_length=args.max_length)
    train_sets = [tokenize(task.train, **encode) for task in tasks]
    test_sets = [tokenize(task.test, **encode) for task in tasks if task.test is not None]
    matrix = AccuracyMatrix([task.name for task in tasks]) if test_sets else None
    collator = DataCollatorWithPadding(tokenizer)
    output = Path(args.output_dir)
    dense = None
    if args.objective == "sparsify" and test_sets and prior is None:  # the model as given, before any pruning
        dense = accuracy_row(model, test_sets, tokenizer, args.eval_batch_size, not args.quiet)
    with tempfile.TemporaryDirectory() as scratch:
        steps = tqdm(list(zip(tasks, train_sets, strict=True)), desc="Tasks", disable=args.quiet)
        for index, (task, train) in enumerate(steps):
            if args.objective == "sparsify":  # keep the function as it is now while walking toward sparsity
                model.remember(train.remove_columns("labels"), task_name=task.name)
            training = TrainingArguments(
                output_dir=scratch,
                max_steps=args.max_steps if args.max_steps > 0 else -1,
                num_train_epochs=args.epochs,
                per_device_train_batch_size=args.per_device_train_batch_size,
                learning_rate=args.learning_rate,
                warmup_steps=int(args.warmup_steps) if args.warmup_steps >= 1 else args.warmup_steps,
                logging_steps=args.logging_steps,
                save_strategy="no",
                report_to=[],
                seed=args.seed,
                use_cpu=args.cpu,
                disable_tqdm=args.quiet,
            )
            trainer = FIPTrainer(model=model, args=training, train_dataset=train, data_collator=collator)
            if args.quiet:  # without progress bars the Trainer prints its log lines instead
                trainer.remove_callback(PrinterCallback)
            trainer.train()
            if matrix is not None:
                matrix.record(index, accuracy_row(model, test_sets, tokenizer, args.eval_batch_size, not args.quiet))
                model.record_accuracy(matrix)
            if args.objective == "continual":
                model.remember(train.remove_columns("labels"), task_name=task.name)
            if len(tasks) > 1:  # the checkpoint after each task: `eval` of one per task gives the accuracy matrix
                save_adapter(model, tokenizer, labels, args, output / AFTER_TASK.format(index + 1))
    save_adapter(model, tokenizer, labels, args, output)
    if matrix is not None:
        print(matrix)
    if args.objective == "sparsify":
        config = model.peft_config[model.active_adapter]
        names = ("sparsity_criterion", "sparsity_scope", "sparsity_schedule")
        recipe = ", ".join(f"{name}={getattr(config, name)!r}" for name in names)
        print(
            f"sparsity: {model.sparsity_report()['sparsity']:.4f} (target {config.target_sparsity}; {recipe}, "
            f"learning rate {args.learning_rate:g})"
        )
        if dense is not None and matrix is not None:
            sparse = matrix.matrix[len(tasks) - 1]
            tested = [task for task in tasks if task.test is not None]
            for task, test, before, after in zip(tested, test_sets, dense, sparse, strict=True):
                print(
                    f"accuracy on {len(test)} held-out rows of {task.name}: dense {before:.4f}, sparse {after:.4f} "
                    f"({100 * (after - before):+.1f} points)"
                )
    print(
        f"adapter saved to {output}"
        + (f" (and after each task in {output / AFTER_TASK.format('N')})" if len(tasks) > 1 else "")
    )
    if args.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(output / MERGED)
        tokenizer.save_pretrained(output / MERGED)
        print(f"merged model saved to {output / MERGED}")
    return 0


def save_adapter(model, tokenizer, labels: list[str], args: argparse.Namespace, folder: Path) -> None:
    """The adapter with its card, the tokenizer, and `fip_labels.json`: the labels, the columns, and the split and
    model that `eval` uses by default."""
    hub_id = base_model_hub_id(args.model, args.base_model_id)
    if hub_id:  # the adapter and its card name the base by its Hub id; fip_labels.json keeps the local folder
        for config in model.peft_config.values():
            config.base_model_name_or_path = hub_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {"labels": labels, "text_column": args.text_column, "label_column": args.label_column}
    meta.update(max_length=args.max_length, test_fraction=args.test_fraction, seed=args.seed)
    meta["model"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    (folder / LABELS_FILE).write_text(json.dumps(meta, indent=2) + "\n")


# ---- loading adapters: eval and info --------------------------------------------------------------------------------


def _base_name(adapter: dict[str, Any], model_name: str | None) -> str:
    """The base model of an adapter: --model, else the local model it was trained on, else the one it names."""
    if model_name:
        return model_name
    local = (adapter["meta"] or {}).get("model")
    if local and Path(local).exists():
        return local
    base_name = adapter["config"].get("base_model_name_or_path")
    if not base_name:
        raise CLIError(f"{adapter['folder']}: the adapter does not name its base model; pass --model.")
    return base_name


def _load_model(adapter: dict[str, Any], model_name: str | None):
    from peft import PeftModel

    labels = adapter["meta"]["labels"] if adapter["meta"] else None
    base = load_classifier(_base_name(adapter, model_name), "--model", labels)
    return PeftModel.from_pretrained(base, adapter["folder"]).eval()


def run_eval(args: argparse.Namespace) -> int:
    """Accuracy of each adapter (one row each, e.g. the checkpoints after each task) on each task file's held-out
    rows (the split `train` made, by default)."""
    adapters = [read_adapter(path) for path in args.adapter]
    for adapter in adapters:
        if adapter["meta"] is None and args.model is None:
            raise CLIError(f"{adapter['folder']}: no {LABELS_FILE} (written by `fip-peft train`); pass --model.")
    check_model(args.model, "--model")
    check_model(args.tokenizer, "--tokenizer")
    first_meta = adapters[0]["meta"] or {}
    text_column = args.text_column or first_meta.get("text_column", "text")
    label_column = args.label_column or first_meta.get("label_column", "label")
    test_fraction = args.test_fraction if args.test_fraction is not None else first_meta.get("test_fraction", 0.0)
    seed = args.seed if args.seed is not None else first_meta.get("seed", 0)
    if not 0 <= test_fraction < 1:
        raise CLIError(f"--test-fraction must be in [0, 1), got {test_fraction}; 0 scores every row.")
    tasks = load_task_files(args.task, text_column, label_column, test_fraction, seed, quiet=args.quiet)
    for adapter in adapters:
        known = set(adapter["meta"]["labels"]) if adapter["meta"] else None
        for task in tasks:
            rows = list(task.train[label_column]) + (list(task.test[label_column]) if task.test is not None else [])
            unknown = sorted({str(v) for v in rows} - known) if known is not None else []
            if unknown:
                raise CLIError(
                    f"--task {task.path}: labels {unknown[:5]} are not classes of {adapter['folder']} "
                    f"({sorted(known)})."
                )
    _quiet_libraries(args.quiet)

    from ..method.accuracy import AccuracyMatrix

    rows = []
    for adapter in adapters:
        meta = adapter["meta"] or {}
        tokenizer = _load_tokenizer(args.tokenizer or args.model or str(adapter["folder"]), "--tokenizer")
        model = _load_model(adapter, args.model)
        label2id = {str(v): int(k) for k, v in model.get_base_model().config.id2label.items()}
        encode = {"tokenizer": tokenizer, "text_column": text_column, "label_column": label_column}
        encode.update(label2id=label2id, max_length=meta.get("max_length", args.max_length))
        tests = [tokenize(task.test if task.test is not None else task.train, **encode) for task in tasks]
        rows.append(accuracy_row(model, tests, tokenizer, args.eval_batch_size, not args.quiet))
    names = [task.name for task in tasks]
    scored = f"held-out rows (--test-fraction {test_fraction}, --seed {seed})" if test_fraction else "all rows"
    print(f"accuracy on each task's {scored}")
    if len(rows) == len(tasks):
        matrix = AccuracyMatrix(names)
        for index, row in enumerate(rows):
            matrix.record(index, row)
        print(matrix)
        result = matrix.to_dict()
    else:
        width = max(len(n) for n in names)
        for adapter, row in zip(adapters, rows, strict=True):
            print(adapter["folder"])
            print("\n".join(f"  {name.ljust(width)}  {acc:.4f}" for name, acc in zip(names, row, strict=True)))
        result = {"adapters": [str(a["folder"]) for a in adapters], "task_names": names, "accuracy": rows}
    result["test_fraction"], result["seed"] = test_fraction, seed
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def adapter_info(path: str, model_name: str | None = None) -> dict[str, Any]:
    """What `fip-peft info` reports: settings, task history with anchors per task, accuracy matrix, sparsity."""
    import torch
    from safetensors import safe_open

    adapter = read_adapter(path, flag="")
    config = adapter["config"]
    weights = adapter["folder"] / ADAPTER_WEIGHTS
    task_ids = None
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            key = next((k for k in handle.keys() if k.endswith("fip_memory.task_ids")), None)
            task_ids = handle.get_tensor(key) if key else None
    counts = torch.bincount(task_ids).tolist() if task_ids is not None and task_ids.numel() else []
    from ..method.accuracy import task_history

    keys = ["base_model_name_or_path", "objective", "distance", "beta", "rank", "anchor_budget", "save_anchors"]
    keys += ["target_sparsity"] if config.get("objective") == "sparsify" else []
    info = {
        "adapter": str(adapter["folder"]),
        "config": {key: config.get(key) for key in keys},
        "target_modules": config.get("target_modules"),
        "tasks": [
            {"task": name, "anchors": anchors}
            for name, anchors in task_history(config.get("task_names") or [], counts)
        ],
        "anchors": int(sum(counts)),
        "accuracy_matrix": config.get("accuracy_matrix"),
        "labels": adapter["meta"]["labels"] if adapter["meta"] else None,
    }
    if config.get("objective") == "sparsify":
        report = _load_model(adapter, model_name).sparsity_report()
        info["sparsity"] = {key: report[key] for key in ("sparsity", "zeros", "total", "target_sparsity")}
    return info


def run_info(args: argparse.Namespace) -> int:
    info = adapter_info(args.adapter, args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"FIP adapter {info['adapter']}")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    print(f"  target_modules: {info['target_modules']}")
    if info["labels"]:
        print(f"  labels: {info['labels']}")
    saved = "" if info["config"]["save_anchors"] else " (save_anchors=False: none saved)"
    print(f"tasks ({len(info['tasks'])}), anchors saved: {info['anchors']}{saved}")
    for index, task in enumerate(info["tasks"]):
        anchors = task["anchors"] if task["anchors"] is not None else "none saved"
        print(f"  {index}: {task['task']}  anchors {anchors}")
    if info["accuracy_matrix"]:
        from ..method.accuracy import AccuracyMatrix

        print(AccuracyMatrix.from_dict(info["accuracy_matrix"]))
    if "sparsity" in info:
        sparsity = info["sparsity"]
        print(
            f"sparsity: {sparsity['sparsity']:.4f} ({sparsity['zeros']} of {sparsity['total']} target weight "
            f"entries are zero; target {sparsity['target_sparsity']})"
        )
    return 0


# ---- the command line -----------------------------------------------------------------------------------------------


RUNS = {"train": run_train, "sparsify": run_train, "eval": run_eval, "info": run_info}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return RUNS[args.command](args)
    except CLIError as error:
        parser.exit(2, f"fip-peft: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
