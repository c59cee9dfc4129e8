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
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SUFFIX_TO_BUILDER = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
LABELS_FILE = "fip_labels.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CLIError(Exception):
    """Bad input: printed as `fip-peft: error: ...` with exit status 2, before any work is done."""


@dataclass
class TaskData:
    """One task file: its name (the file's stem), training rows, and held-out rows for the accuracy matrix."""

    name: str
    path: Path
    train: Any
    test: Any


# ---- checking and loading task files --------------------------------------------------------------------------------


def _builder(path: Path) -> str:
    builder = SUFFIX_TO_BUILDER.get(path.suffix.lower())
    if builder is None:
        raise CLIError(
            f"--task {path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIX_TO_BUILDER)}."
        )
    return builder


def load_task_files(
    paths: list[str], text_column: str, label_column: str, test_fraction: float, seed: int
) -> list[TaskData]:
    """Read and check every task file (existence, type, columns, enough rows) and split off a test part."""
    import datasets

    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise CLIError(f"--task: no such file: {', '.join(missing)}.")
    builders = [_builder(Path(p)) for p in paths]
    tasks, names = [], set()
    for path, builder in zip(map(Path, paths), builders, strict=True):
        try:
            data = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:
            raise CLIError(f"--task {path}: cannot read it as {builder}: {error}") from error
        absent = [c for c in (text_column, label_column) if c not in data.column_names]
        if absent:
            flags = {text_column: "--text-column", label_column: "--label-column"}
            raise CLIError(
                f"--task {path}: no column {', '.join(repr(c) for c in absent)} (columns: {data.column_names}); "
                f"name the right one with {' / '.join(flags[c] for c in absent)}."
            )
        needed = 2 if test_fraction > 0 else 1  # a held-out part needs a row of its own
        if len(data) < needed:
            raise CLIError(f"--task {path}: needs at least {needed} rows, has {len(data)}.")
        name = path.stem if path.stem not in names else str(path)
        names.add(name)
        data = data.select_columns([text_column, label_column])
        if test_fraction > 0:
            split = data.train_test_split(test_size=test_fraction, seed=seed)
            tasks.append(TaskData(name, path, split["train"], split["test"]))
        else:
            tasks.append(TaskData(name, path, data, None))
    return tasks


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


def accuracy_row(model, tests: list, tokenizer, batch_size: int) -> list[float]:
    from transformers import DataCollatorWithPadding

    from .evaluation import evaluate_tasks

    return evaluate_tasks(
        model, [_Rows(t) for t in tests], batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer)
    )


# ---- train and sparsify ---------------------------------------------------------------------------------------------


def _check_training_args(args: argparse.Namespace) -> None:
    if not 0 <= args.test_fraction < 1:
        raise CLIError(f"--test-fraction must be in [0, 1), got {args.test_fraction}.")
    if args.objective == "sparsify" and args.target_sparsity is None:
        raise CLIError("--objective sparsify needs --target-sparsity, e.g. --target-sparsity 0.5.")
    if args.objective != "sparsify" and args.target_sparsity is not None:
        raise CLIError("--target-sparsity needs --objective sparsify (or the `fip-peft sparsify` command).")
    if args.warmup_steps < 0 or (args.warmup_steps >= 1 and not float(args.warmup_steps).is_integer()):
        raise CLIError(
            f"--warmup-steps must be a whole number of steps or a fraction in [0, 1), got {args.warmup_steps}."
        )
    if args.max_steps <= 0 and args.epochs <= 0:
        raise CLIError("give --max-steps > 0 or --epochs > 0.")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output-dir {output} is a file; give a folder.")


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


def _fip_config(args: argparse.Namespace):
    from .config import FIPConfig

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
        steps = args.max_steps if args.max_steps > 0 else 100
        kwargs.update(target_sparsity=args.target_sparsity, sparsity_ramp_steps=max(1, steps // 2))
    try:
        return FIPConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise CLIError(str(error)) from error


def run_train(args: argparse.Namespace) -> int:
    """Learn the task files in turn with one FIP adapter, evaluating every task after each; save the adapter."""
    _check_training_args(args)
    tasks = load_task_files(args.task, args.text_column, args.label_column, args.test_fraction, args.seed)
    config = _fip_config(args)
    labels = label_names(tasks, args.label_column)

    from peft import get_peft_model
    from tqdm.auto import tqdm
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging

    from .evaluation import AccuracyMatrix
    from .trainer import FIPTrainer

    set_seed(args.seed)
    model_labels = dict(AutoConfig.from_pretrained(args.model).label2id or {})
    if set(labels) <= set(model_labels):  # a classifier that already knows these classes keeps its head
        labels = sorted(model_labels, key=model_labels.get)
    label2id = {name: index for index, name in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    base = AutoModelForSequenceClassification.from_pretrained(
        args.model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
        ignore_mismatched_sizes=True,
    )
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
    encode = {"tokenizer": tokenizer, "text_column": args.text_column, "label_column": args.label_column}
    encode.update(label2id=label2id, max_length=args.max_length)
    train_sets = [tokenize(task.train, **encode) for task in tasks]
    test_sets = [tokenize(task.test, **encode) for task in tasks if task.test is not None]
    matrix = AccuracyMatrix([task.name for task in tasks]) if test_sets else None
    collator = DataCollatorWithPadding(tokenizer)
    with tempfile.TemporaryDirectory() as scratch:
        for index, (task, train) in enumerate(tqdm(list(zip(tasks, train_sets, strict=True)), desc="Tasks")):
            if args.objective == "sparsify":  # keep the function as it is now while walking toward sparsity
                model.remember(train.remove_columns("labels"), task_name=task.name)
            training = TrainingArguments(
                output_dir=scratch,
                max_steps=args.max_steps if args.max_steps > 0 else -1,
                num_train_epochs=args.epochs,
                per_device_train_batch_size=args.batch_size,
                learning_rate=args.lr,
                warmup_steps=int(args.warmup_steps) if args.warmup_steps >= 1 else args.warmup_steps,
                logging_steps=args.logging_steps,
                save_strategy="no",
                report_to=[],
                seed=args.seed,
                use_cpu=args.cpu,
                disable_tqdm=args.quiet,
            )
            FIPTrainer(model=model, args=training, train_dataset=train, data_collator=collator).train()
            if matrix is not None:
                matrix.record(index, accuracy_row(model, test_sets, tokenizer, args.eval_batch_size))
            if args.objective == "continual":
                model.remember(train.remove_columns("labels"), task_name=task.name)
    if matrix is not None:
        model.record_accuracy(matrix)
    save_adapter(model, tokenizer, labels, args)
    if matrix is not None:
        print(matrix)
    if args.objective == "sparsify":
        print(f"sparsity: {model.sparsity_report()['sparsity']:.4f} (target {args.target_sparsity})")
    print(f"adapter saved to {args.output_dir}")
    return 0


def save_adapter(model, tokenizer, labels: list[str], args: argparse.Namespace) -> None:
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    meta = {"labels": labels, "text_column": args.text_column, "label_column": args.label_column}
    meta["max_length"] = args.max_length
    (Path(args.output_dir) / LABELS_FILE).write_text(json.dumps(meta, indent=2) + "\n")


# ---- loading adapters: eval and info --------------------------------------------------------------------------------


def read_adapter(path: str) -> dict[str, Any]:
    """The saved FIP adapter at `path`: its config and, when there, the labels file written by `fip-peft train`."""
    folder = Path(path)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CLIError(f"{path}: not an adapter folder (no {ADAPTER_CONFIG}).")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "FIP":
        raise CLIError(f"{path}: a {config.get('peft_type')} adapter, not FIP.")
    labels_path = folder / LABELS_FILE
    meta = json.loads(labels_path.read_text()) if labels_path.is_file() else None
    return {"folder": folder, "config": config, "meta": meta}


def _load_model(adapter: dict[str, Any], model_name: str | None):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base_name = model_name or adapter["config"].get("base_model_name_or_path")
    if not base_name:
        raise CLIError(f"{adapter['folder']}: the adapter does not name its base model; pass --model.")
    labels = adapter["meta"]["labels"] if adapter["meta"] else None
    kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "ignore_mismatched_sizes": True}
    base = AutoModelForSequenceClassification.from_pretrained(base_name, **(kwargs if labels else {}))
    return PeftModel.from_pretrained(base, adapter["folder"]).eval()


def run_eval(args: argparse.Namespace) -> int:
    """Accuracy of each adapter (one row each, e.g. the checkpoints after each task) on each task file."""
    adapters = [read_adapter(path) for path in args.adapter]
    for adapter in adapters:
        if adapter["meta"] is None and args.model is None:
            raise CLIError(f"{adapter['folder']}: no {LABELS_FILE} (written by `fip-peft train`); pass --model.")
    first_meta = adapters[0]["meta"] or {}
    text_column = args.text_column or first_meta.get("text_column", "text")
    label_column = args.label_column or first_meta.get("label_column", "label")
    tasks = load_task_files(args.task, text_column, label_column, 0.0, 0)
    for adapter in adapters:
        known = set(adapter["meta"]["labels"]) if adapter["meta"] else None
        for task in tasks:
            unknown = sorted({str(v) for v in task.train[label_column]} - known) if known is not None else []
            if unknown:
                raise CLIError(
                    f"--task {task.path}: labels {unknown[:5]} are not classes of {adapter['folder']} "
                    f"({sorted(known)})."
                )

    from transformers import AutoTokenizer

    from .evaluation import AccuracyMatrix

    rows = []
    for adapter in adapters:
        meta = adapter["meta"] or {}
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model or adapter["folder"])
        model = _load_model(adapter, args.model)
        label2id = {str(v): int(k) for k, v in model.get_base_model().config.id2label.items()}
        encode = {"tokenizer": tokenizer, "text_column": text_column, "label_column": label_column}
        encode.update(label2id=label2id, max_length=meta.get("max_length", args.max_length))
        tests = [tokenize(task.train, **encode) for task in tasks]
        rows.append(accuracy_row(model, tests, tokenizer, args.eval_batch_size))
    names = [task.name for task in tasks]
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
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def adapter_info(path: str, model_name: str | None = None) -> dict[str, Any]:
    """What `fip-peft info` reports: settings, task history with anchors per task, accuracy matrix, sparsity."""
    import torch
    from safetensors import safe_open

    adapter = read_adapter(path)
    config = adapter["config"]
    weights = adapter["folder"] / ADAPTER_WEIGHTS
    task_ids = None
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            key = next((k for k in handle.keys() if k.endswith("fip_memory.task_ids")), None)
            task_ids = handle.get_tensor(key) if key else None
    counts = torch.bincount(task_ids).tolist() if task_ids is not None and task_ids.numel() else []
    names = list(config.get("task_names") or [])
    names += [f"task {i}" for i in range(len(names), len(counts))]
    offset = len(names) - len(counts)
    keys = ["base_model_name_or_path", "objective", "distance", "beta", "rank", "anchor_budget", "save_anchors"]
    keys += ["target_sparsity"] if config.get("objective") == "sparsify" else []
    info = {
        "adapter": str(adapter["folder"]),
        "config": {key: config.get(key) for key in keys},
        "target_modules": config.get("target_modules"),
        "tasks": [
            {"task": name, "anchors": counts[i - offset] if i >= offset else None} for i, name in enumerate(names)
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
        from .evaluation import AccuracyMatrix

        print(AccuracyMatrix.from_dict(info["accuracy_matrix"]))
    if "sparsity" in info:
        sparsity = info["sparsity"]
        print(
            f"sparsity: {sparsity['sparsity']:.4f} ({sparsity['zeros']} of {sparsity['total']} target weight "
            f"entries are zero; target {sparsity['target_sparsity']})"
        )
    return 0


# ---- the parser -----------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one to show (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def _add_data_args(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    parser.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="FILE",
        help="A task's data file (.csv, .json, .jsonl or .parquet). Repeat for several tasks, in training order; "
        "a task is named after its file.",
    )
    parser.add_argument(
        "--text-column",
        default="text" if defaults else None,
        help="Column holding the input text." + ("" if defaults else " Default: as at training, else 'text'."),
    )
    parser.add_argument(
        "--label-column",
        default="label" if defaults else None,
        help="Column holding the class label (any values)."
        + ("" if defaults else " Default: as at training, else 'label'."),
    )
    parser.add_argument("--max-length", type=int, default=128, help="Longest input in tokens (longer is truncated).")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="Batch size of evaluation.")


def _add_training_args(parser: argparse.ArgumentParser, sparsify: bool) -> None:
    parser.add_argument(
        "--model", required=True, help="Base model: a Hub name or local folder for AutoModelForSequenceClassification."
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer name or folder. Default: the --model's.")
    parser.add_argument("--output-dir", required=True, help="Folder for the adapter, its tokenizer and labels.")
    _add_data_args(parser, defaults=True)
    if not sparsify:
        parser.add_argument(
            "--objective",
            choices=["continual", "sparsify"],
            default="continual",
            help="continual: learn each task in turn, then remember it so later tasks keep it. sparsify: remember "
            "each task's inputs first, then walk the weights to --target-sparsity zeros while training on it.",
        )
    parser.add_argument(
        "--target-sparsity",
        type=float,
        required=sparsify,
        default=None,
        help="Fraction of the adapted weights' entries to make exactly zero, in [0, 1) (objective sparsify).",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="Share of each task file held out to measure the accuracy matrix; 0 trains on all rows, no matrix.",
    )
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs per task (ignored with --max-steps).")
    parser.add_argument("--max-steps", type=int, default=-1, help="Optimizer steps per task; -1 uses --epochs.")
    parser.add_argument("--batch-size", type=int, default=16, help="Training batch size.")
    parser.add_argument("--lr", type=float, default=1e-4, help="Learning rate (AdamW). Raise ~10x with --rank.")
    parser.add_argument(
        "--warmup-steps",
        type=float,
        default=0.1,
        help="Linear warm-up of each task: a whole number of steps, or a fraction in [0, 1) of its steps.",
    )
    parser.add_argument(
        "--beta", type=float, default=None, help="FIP beta: larger learns faster, preserves less. Default: FIP's."
    )
    parser.add_argument("--rank", type=int, default=None, help="Low-rank displacement of this rank (default: full).")
    parser.add_argument(
        "--distance",
        choices=["logits", "bhattacharyya", "kl"],
        default="logits",
        help="Output distance kept on the anchors.",
    )
    parser.add_argument("--anchor-budget", type=int, default=512, help="Most anchors kept over all tasks.")
    parser.add_argument(
        "--no-save-anchors",
        action="store_true",
        help="Leave the anchors (training inputs) out of the saved adapter: private, but training cannot resume "
        "without forgetting.",
    )
    if not sparsify:
        parser.add_argument(
            "--pooler",
            choices=["auto", "keep"],
            default="auto",
            help="auto: when the model's BERT-style pooler was never trained (bias all zero, as in sentence-"
            "embedding checkpoints like all-MiniLM-L6-v2), train it in full from a pass-through start and save it "
            "with the adapter, like the new head (PEFT modules_to_save; loads with PeftModel.from_pretrained). "
            "keep: adapt it like any other linear layer. Objective continual only.",
        )
    parser.add_argument("--logging-steps", type=int, default=50, help="Optimizer steps between log lines.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split, initialisation and sampling.")
    parser.add_argument("--cpu", action="store_true", help="Train on the CPU even when a GPU is there.")
    parser.add_argument("--quiet", action="store_true", help="No training progress bars.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fip-peft",
        description="Functionally invariant paths (FIP) for text classification: learn tasks in turn without "
        "forgetting, sparsify while keeping the function, evaluate and inspect FIP adapters.",
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = _HelpFormatter

    train = commands.add_parser(
        "train",
        help="Learn task files in turn with a FIP adapter; print the accuracy matrix; save the adapter.",
        description="Learn the --task files in turn with one FIP adapter and one shared classification head over "
        "the labels of all tasks. After each task: evaluate every task's held-out rows (one row of the accuracy "
        "matrix) and remember the task (anchors + outputs), so that later tasks keep it.",
        formatter_class=formatter,
    )
    _add_training_args(train, sparsify=False)
    train.set_defaults(func=run_train)

    sparsify = commands.add_parser(
        "sparsify",
        help="Walk a model's weights to a target sparsity while keeping its outputs on the task data.",
        description="Remember the --task data's inputs (the function to keep), then train on the task while the "
        "weights walk to --target-sparsity exact zeros (train --objective sparsify).",
        formatter_class=formatter,
    )
    _add_training_args(sparsify, sparsify=True)
    sparsify.set_defaults(func=run_train, objective="sparsify", pooler="keep")

    evaluate = commands.add_parser(
        "eval",
        help="Accuracy of adapters on task files (an accuracy matrix with one adapter per task).",
        description="Accuracy of each --adapter on each --task file. With as many adapters as tasks (the "
        "checkpoints after each task) the rows form the accuracy matrix, printed with ACC, BWT and forgetting.",
        formatter_class=formatter,
    )
    evaluate.add_argument(
        "--adapter", action="append", required=True, metavar="FOLDER", help="A saved FIP adapter. Repeatable."
    )
    evaluate.add_argument("--model", default=None, help="Base model. Default: the one the adapter names.")
    evaluate.add_argument("--tokenizer", default=None, help="Tokenizer. Default: the one saved with the adapter.")
    _add_data_args(evaluate, defaults=False)
    evaluate.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")
    evaluate.set_defaults(func=run_eval)

    info = commands.add_parser(
        "info",
        help="Show an adapter's settings, tasks, anchors per task, accuracy matrix and sparsity.",
        description="Read a saved FIP adapter: its settings, task history with the anchors kept per task, the "
        "recorded accuracy matrix, and (objective sparsify, which loads the base model) the sparsity reached.",
        formatter_class=formatter,
    )
    info.add_argument("adapter", help="Folder of a saved FIP adapter.")
    info.add_argument("--model", default=None, help="Base model, for sparsity. Default: the one the adapter names.")
    info.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    info.set_defaults(func=run_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as error:
        parser.exit(2, f"fip-peft: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
