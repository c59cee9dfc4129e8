"""Class-incremental split Fashion-MNIST with a FIP adapter on a small CNN, and what plain fine-tuning forgets.

Fashion-MNIST is split into 5 tasks of 2 classes (task ``t`` holds classes ``2t`` and ``2t + 1``). One shared 10-way
head covers every class and accuracy is the argmax over all 10 (class-incremental: no task id at test time). A small
CNN built here is adapted by ``fip_peft`` (``conv1``, ``conv2`` and ``fc1`` get a FIP displacement, the ``head`` is
trained in full) and trained with ``fip_peft.create_fip_optimizer`` in a plain PyTorch loop. For each task in turn
the script trains ``--steps-per-task`` steps, evaluates every task's test split (one row of the accuracy matrix R),
then calls ``model.remember`` on the task's training images so that later tasks keep its outputs. It prints R with
ACC, BWT and forgetting, writes ``R.json`` and ``R.png`` to the output folder and saves the adapter (anchors
included) to ``<output-dir>/adapter``.

Run from the repository root (offline: Fashion-MNIST comes from ``apt-get install -y dataset-fashion-mnist``)::

    python examples/continual_vision.py              # FIP on the 5 tasks
    python examples/continual_vision.py --baseline   # also plain fine-tuning of the same adapter, side by side
    python examples/continual_vision.py --help
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from data import load_fashion_mnist, split_tasks
from peft import get_peft_model
from reporting import print_report, save_matrix
from torch import nn
from tqdm.auto import tqdm

import fip_peft
from fip_peft.config import DEFAULT_BETA_FULL_RANK, DEFAULT_BETA_LOW_RANK
from fip_peft.evaluation import AccuracyMatrix

logger = logging.getLogger("fip_peft.examples.continual_vision")

CLASSES_PER_TASK = 2
NUM_CLASSES = 10
CLASS_NAMES = ("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


@dataclass
class Task:
    """One task: its classes and its train/test images with labels in the shared head's 10 classes."""

    name: str
    classes: list[int]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class RunResult:
    """What one continual run produced: the accuracy matrix, the final model and seconds spent per phase."""

    matrix: AccuracyMatrix
    model: Any
    timings: dict[str, float] = field(default_factory=dict)


class SmallCNN(nn.Module):
    """Two conv + ReLU + max-pool blocks, a hidden Linear layer and a 10-way ``head``."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def build_tasks(args: argparse.Namespace) -> list[Task]:
    """Split Fashion-MNIST into tasks of ``CLASSES_PER_TASK`` classes; ``--train-size`` random train images each."""
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    generator = torch.Generator().manual_seed(args.seed)
    tasks = []
    splits = zip(split_tasks(train_labels, CLASSES_PER_TASK), split_tasks(test_labels, CLASSES_PER_TASK), strict=True)
    for index, (train_index, test_index) in enumerate(splits):
        train_index = torch.from_numpy(train_index)
        train_index = train_index[torch.randperm(len(train_index), generator=generator)[: args.train_size]]
        test_index = torch.from_numpy(test_index)
        classes = [CLASSES_PER_TASK * index + k for k in range(CLASSES_PER_TASK)]
        tasks.append(
            Task(
                name="/".join(CLASS_NAMES[c] for c in classes),
                classes=classes,
                train_images=train_images[train_index],
                train_labels=train_labels[train_index],
                test_images=test_images[test_index],
                test_labels=test_labels[test_index],
            )
        )
        logger.info(
            f"Task {index} {tasks[-1].name!r}: classes {classes}, {len(train_index)} train / "
            f"{len(test_index)} test images."
        )
    return tasks


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``images`` whose argmax over all classes of the head is the label."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=-1) == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def run_continual(args: argparse.Namespace, tasks: list[Task], *, remember: bool) -> RunResult:
    """Train the tasks in order on a fresh FIP adapter; ``remember=False`` is plain fine-tuning of the same adapter."""
    label = "FIP" if remember else "baseline"
    torch.manual_seed(args.seed)
    config_kwargs = {"beta": args.beta} if args.beta is not None else {}
    config = fip_peft.FIPConfig(
        target_modules=["conv1", "conv2", "fc1"],
        modules_to_save=["head"],
        rank=args.rank,
        anchor_budget=args.anchors,
        **config_kwargs,
    )
    model = get_peft_model(SmallCNN(), config)
    if remember:
        logger.info(f"FIP config: beta={config.beta}, rank={config.rank}, anchor_budget={config.anchor_budget}.")
    model.print_trainable_parameters()
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    matrix = AccuracyMatrix(task_names=[task.name for task in tasks])
    timings: dict[str, float] = {}
    model.train()
    for index, task in enumerate(tasks):
        start = time.perf_counter()
        progress = tqdm(range(args.steps_per_task), desc=f"[{label}] task {index} {task.name}", leave=False)
        for _ in progress:
            batch = torch.randint(len(task.train_images), (args.batch_size,), generator=generator)
            loss = nn.functional.cross_entropy(model(task.train_images[batch]), task.train_labels[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        timings[f"train {task.name}"] = time.perf_counter() - start

        start = time.perf_counter()
        accuracies = [accuracy(model, t.test_images, t.test_labels) for t in tasks]
        matrix.record(after_task=index, accuracies=accuracies)
        timings[f"evaluate after {task.name}"] = time.perf_counter() - start
        row = ", ".join(f"{t.name} {acc:.4f}" for t, acc in zip(tasks, accuracies, strict=True))
        logger.info(f"[{label}] accuracy after {task.name}: {row}")

        if remember:
            start = time.perf_counter()
            summary = model.remember(task.train_images)
            timings[f"remember {task.name}"] = time.perf_counter() - start
            logger.info(f"[{label}] anchors per task: {summary['anchors_per_task']}")
    return RunResult(matrix=matrix, model=model, timings=timings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=(
            "Class-incremental split Fashion-MNIST (5 tasks of 2 classes, one shared 10-way head) on a small CNN "
            "with a FIP adapter (functionally invariant paths, arXiv 2205.00334): train each task in turn, remember "
            "it, and report the accuracy matrix R[i][j] (task j after training task i) with ACC, BWT and forgetting."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps-per-task", type=int, default=200, help="Optimizer steps per task.")
    parser.add_argument("--batch-size", type=int, default=64, help="Training batch size.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Learning rate (AdamW).")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help=f"FIPConfig.beta, the weight of the new task against keeping remembered outputs; larger preserves "
        f"less (default: FIPConfig's, {DEFAULT_BETA_FULL_RANK} full rank, "
        f"{DEFAULT_BETA_LOW_RANK} low rank).",
    )
    parser.add_argument("--rank", type=int, default=None, help="Rank of the FIP displacement (default: full rank).")
    parser.add_argument(
        "--anchors",
        type=int,
        default=200,
        help="FIPConfig.anchor_budget: anchors kept over all remembered tasks, split evenly (200 = 20 per class).",
    )
    parser.add_argument("--train-size", type=int, default=2000, help="Training images per task (random subset).")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="Also run plain fine-tuning (the same adapter, never calling remember) and print both matrices.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of data subsets, initialisation and batches.")
    parser.add_argument(
        "--output-dir", default="outputs/continual_vision", help="Where R.json, R.png and the adapter go."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run FIP (and, with ``--baseline``, plain fine-tuning) on split Fashion-MNIST and report both."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("fip_peft").setLevel(logging.INFO)
    output_dir = Path(args.output_dir)

    total_start = time.perf_counter()
    start = time.perf_counter()
    tasks = build_tasks(args)
    data_seconds = time.perf_counter() - start

    fip = run_continual(args, tasks, remember=True)
    fip.timings = {"load data": data_seconds, **fip.timings}
    start = time.perf_counter()
    written = save_matrix(fip.matrix, output_dir, "FIP")
    adapter_dir = output_dir / "adapter"
    fip.model.save_pretrained(adapter_dir)
    fip.timings["save"] = time.perf_counter() - start

    baseline = run_continual(args, tasks, remember=False) if args.baseline else None
    if baseline is not None:
        written += save_matrix(baseline.matrix, output_dir / "baseline", "plain fine-tuning")

    print_report(fip, baseline, NUM_CLASSES, [*written, adapter_dir], time.perf_counter() - total_start)


if __name__ == "__main__":
    main()
