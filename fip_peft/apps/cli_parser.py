"""The `fip-peft` command line's options (argparse), kept apart from the commands so that `--help` loads nothing
heavy."""

from __future__ import annotations

import argparse

from ..choices import CRITERIA, DISTANCES, OBJECTIVES, SCHEDULES, SCOPES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one to show (not None, not an off switch) and the help does not (the
    example scripts use it too)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.required or "default" in help_text.lower():
            return help_text
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
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.2 if defaults else None,
        help="Share of each task file held out to measure the accuracy matrix; 0 "
        + ("trains on all rows, no matrix." if defaults else "scores every row. Default: as at training."),
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0 if defaults else None,
        help="Seed of the held-out split"
        + (", initialisation and sampling." if defaults else ". Default: as at training."),
    )
    parser.add_argument("--max-length", type=int, default=128, help="Longest input in tokens (longer is truncated).")
    parser.add_argument(
        "--eval-batch-size", "--per-device-eval-batch-size", type=int, default=64, help="Batch size of evaluation."
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def _add_training_args(parser: argparse.ArgumentParser, sparsify: bool) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="Base model: a Hub id or a local folder for AutoModelForSequenceClassification. Required unless "
        "--adapter names an adapter whose base model is here.",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="DIR_OR_HUB_ID",
        help="Continue training this FIP adapter (saved by fip-peft) on the --task files: its settings, head classes "
        "and remembered tasks are kept. Default: a new adapter.",
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer name or folder. Default: the --model's.")
    parser.add_argument(
        "--output-dir",
        required=True,
        help="Folder for the adapter, its tokenizer and labels; with several tasks also after-task-N/ per task.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output-dir.")
    parser.add_argument(
        "--merge", action="store_true", help="Also save a merged plain model (no PEFT needed) in --output-dir/merged."
    )
    parser.add_argument(
        "--base-model-id",
        default=None,
        help="Hub id of the base model, recorded in the adapter and its card when --model is a local folder "
        "(e.g. sentence-transformers/all-MiniLM-L6-v2).",
    )
    _add_data_args(parser, defaults=True)
    if not sparsify:
        parser.add_argument(
            "--objective",
            choices=OBJECTIVES,
            default="continual",
            help="continual: learn each task in turn, then remember it so later tasks keep it. sparsify: remember "
            "each task's inputs first, then walk the weights to --target-sparsity zeros while training on it.",
        )
    parser.add_argument(
        "--target-sparsity",
        type=float,
        default=None,
        help="Fraction of the adapted weights' entries to make exactly zero, in [0, 1) (objective sparsify; "
        "implied 0.5 by --sparsity-scope 2:4).",
    )
    parser.add_argument(
        "--sparsity-ramp-steps",
        type=int,
        default=None,
        help="Optimizer steps over which the mask ramps to --target-sparsity. Default: half the first task's steps.",
    )
    parser.add_argument(
        "--sparsity-criterion",
        choices=CRITERIA,
        default=None,
        help="Which weights go first: smallest magnitude, smallest saliency on the remembered inputs, or optimal "
        "brain surgeon (needs --sparsity-scope layer or 2:4). Default: the best measured for --target-sparsity "
        "(magnitude at moderate, obs at high, saliency at very high sparsity; FIPConfig.sparsity_criterion).",
    )
    parser.add_argument(
        "--sparsity-scope",
        choices=SCOPES,
        default=None,
        help="global: one threshold over all adapted weights; layer: the same sparsity in each; 2:4: 2 zeros in "
        "every 4 consecutive inputs of a row (sparsity 0.5). Default: layer for obs, else global.",
    )
    parser.add_argument(
        "--sparsity-schedule",
        choices=SCHEDULES,
        default=None,
        help="How the mask ramps to the target over --sparsity-ramp-steps: cubic, linear, or constant (all at the "
        "first step, then the walk repairs). Default: constant for obs, else cubic.",
    )
    parser.add_argument(
        "--num-train-epochs",
        "--epochs",
        dest="epochs",
        type=float,
        default=1.0,
        help="Epochs per task (ignored with --max-steps).",
    )
    parser.add_argument("--max-steps", type=int, default=-1, help="Optimizer steps per task; -1 uses --epochs.")
    parser.add_argument(
        "--per-device-train-batch-size", "--batch-size", type=int, default=16, help="Training batch size."
    )
    parser.add_argument(
        "--learning-rate",
        "--lr",
        type=float,
        default=None,
        help="Peak learning rate (AdamW). Default: 1e-4 for continual learning; for sparsify the rate measured "
        "with the recipe of --target-sparsity (fip_peft.math.sparsity.recommended_recipe; the pull toward sparsity "
        "moves "
        "each weight by about the learning rate per step). Raise ~10x with --rank.",
    )
    parser.add_argument(
        "--warmup-steps",
        type=float,
        default=0.1,
        help="Linear warm-up of each task: a whole number of steps, or a fraction in [0, 1) of its steps.",
    )
    parser.add_argument(
        "--beta", type=float, default=None, help="FIP beta: larger learns faster, preserves less. Default: FIP's."
    )
    parser.add_argument("--rank", type=int, default=None, help="Low-rank displacement of this rank. Default: full.")
    parser.add_argument(
        "--distance",
        choices=DISTANCES,
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
            "embedding checkpoints), train it in full from a pass-through start and save it with the adapter, like "
            "the head. keep: adapt it like any other linear layer. Objective continual only.",
        )
    parser.add_argument("--logging-steps", type=int, default=50, help="Optimizer steps between log lines.")
    parser.add_argument("--cpu", action="store_true", help="Train on the CPU even when a GPU is there.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fip-peft")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fip-peft",
        description="Functionally invariant paths (FIP) for text classification: learn tasks in turn without "
        "forgetting, sparsify while keeping the function, evaluate and inspect FIP adapters.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fip-peft {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = HelpFormatter

    train = commands.add_parser(
        "train",
        help="Learn task files in turn with a FIP adapter; print the accuracy matrix; save the adapter.",
        description="Learn the --task files in turn with one FIP adapter and one shared classification head over "
        "the labels of all tasks. After each task: evaluate every task's held-out rows (one row of the accuracy "
        "matrix), remember the task (anchors + outputs) so that later tasks keep it, and save the adapter so far.",
        formatter_class=formatter,
    )
    _add_training_args(train, sparsify=False)

    sparsify = commands.add_parser(
        "sparsify",
        help="Walk a model's weights to a target sparsity while keeping its outputs on the task data.",
        description="Remember the --task data's inputs (the function to keep), then train on the task while the "
        "weights walk to --target-sparsity exact zeros (train --objective sparsify).",
        formatter_class=formatter,
    )
    _add_training_args(sparsify, sparsify=True)
    sparsify.set_defaults(objective="sparsify", pooler="keep")

    evaluate = commands.add_parser(
        "eval",
        help="Accuracy of adapters on task files (an accuracy matrix with one adapter per task).",
        description="Accuracy of each --adapter on each --task file's held-out rows (the split train made: same "
        "--test-fraction and --seed). With as many adapters as tasks (train's after-task-N folders) the rows form "
        "the accuracy matrix, printed with ACC, BWT and forgetting.",
        formatter_class=formatter,
    )
    evaluate.add_argument(
        "--adapter", action="append", required=True, metavar="FOLDER", help="A saved FIP adapter. Repeatable."
    )
    evaluate.add_argument("--model", default=None, help="Base model. Default: the one the adapter was trained on.")
    evaluate.add_argument("--tokenizer", default=None, help="Tokenizer. Default: the one saved with the adapter.")
    _add_data_args(evaluate, defaults=False)
    evaluate.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")

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

    return parser
