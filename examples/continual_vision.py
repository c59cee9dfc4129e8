"""Class-incremental split Fashion-MNIST with a FIP adapter on a small CNN or a tiny ViT, and what plain
fine-tuning forgets.

Fashion-MNIST is split into 5 tasks of 2 classes (task ``t`` holds classes ``2t`` and ``2t + 1``). One shared 10-way
head covers every class and accuracy is the argmax over all 10 (class-incremental: no task id at test time).

- ``--arch cnn`` (default): a small CNN built here is adapted by ``fip_peft`` (``conv1``, ``conv2`` and ``fc1`` get a
  FIP displacement, the ``head`` is trained in full) and trained with ``fip_peft.create_fip_optimizer`` in a plain
  PyTorch loop.
- ``--arch vit``: a tiny ``ViTForImageClassification`` built from a ``ViTConfig`` (28 x 28 grey images, 7 x 7
  patches, 2 layers of width 64) is adapted on its patch projection and every attention and MLP layer (the
  ``classifier`` is trained in full) and trained with ``fip_peft.FIPTrainer``, a ``transformers.Trainer``.
  ``--model NAME_OR_PATH`` uses a pretrained image classifier instead (images resized and normalised by its image
  processor, every linear layer adapted).

For each task in turn the script trains ``--steps-per-task`` steps, evaluates every task's test split (one row of
the accuracy matrix R), then calls ``model.remember`` on the task's training images so that later tasks keep its
outputs. It prints R with ACC, BWT and forgetting, writes ``R.json`` and ``R.png`` to the output folder and saves
the adapter (anchors included) to ``<output-dir>/adapter``. ``--dataset`` names another image-classification dataset
for ``datasets.load_dataset`` (images made 28 x 28 grey, split into tasks of 2 classes by label value).

Run from the repository root (offline: Fashion-MNIST comes from ``apt-get install -y dataset-fashion-mnist``)::

    python examples/continual_vision.py              # FIP on the 5 tasks, small CNN
    python examples/continual_vision.py --baseline   # also plain fine-tuning of the same adapter, side by side
    python examples/continual_vision.py --arch vit   # tiny ViT through FIPTrainer
    python examples/continual_vision.py --help
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from data import load_fashion_mnist, split_tasks
from peft import get_peft_model
from reporting import print_report, save_matrix
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

import fip_peft
from fip_peft.apps.cli_parser import HelpFormatter
from fip_peft.apps.evaluation import AccuracyMatrix
from fip_peft.method.config import DEFAULT_BETA_FULL_RANK, DEFAULT_BETA_LOW_RANK

logger = logging.getLogger("fip_peft.examples.continual_vision")

CLASSES_PER_TASK = 2
NUM_CLASSES = 10
CLASS_NAMES = ("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
DEFAULT_DATASET = "fashion-mnist"
IMAGE_SIZE = 28


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


def tiny_vit(num_classes: int = NUM_CLASSES) -> ViTForImageClassification:
    """A ViT for 28 x 28 grey images: 16 patches of 7 x 7, 2 layers, width 64, 4 heads, ``num_classes`` labels."""
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=7,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=num_classes,
    )
    return ViTForImageClassification(config)


def _hub_images(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``--dataset`` loaded by ``datasets.load_dataset``: per split, 28 x 28 grey images in [0, 1], labels mapped to
    0..K-1 in sorted order, and class names."""
    import datasets

    loaded = datasets.load_dataset(args.dataset)
    if "test" not in loaded:
        loaded = loaded["train"].train_test_split(test_size=0.2, seed=args.seed)
    columns = {args.image_column, args.label_column}
    for split in ("train", "test"):
        missing = columns - set(loaded[split].column_names)
        if missing:
            raise SystemExit(
                f"--dataset {args.dataset}: the {split} split has no column(s) {sorted(missing)}; its columns are "
                f"{loaded[split].column_names}. Pass --image-column / --label-column."
            )
    values = sorted(set(loaded["train"][args.label_column]))
    feature = loaded["train"].features[args.label_column]
    names = [feature.names[v] if hasattr(feature, "names") else str(v) for v in values]
    result = {}
    for split in ("train", "test"):
        data = loaded[split]
        grey = [np.asarray(image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE))) for image in data[args.image_column]]
        images = torch.from_numpy(np.stack(grey).astype(np.float32) / 255.0).unsqueeze(1)
        labels = torch.tensor([values.index(label) for label in data[args.label_column]])
        result[split] = (images, labels, names)
    return result


def load_images(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Train and test images (N, 1, 28, 28) in [0, 1], labels 0..K-1 and class names of ``--dataset``."""
    if args.dataset != DEFAULT_DATASET:
        return _hub_images(args)
    return {split: (*load_fashion_mnist(split), list(CLASS_NAMES)) for split in ("train", "test")}


def build_tasks(args: argparse.Namespace) -> list[Task]:
    """Split the dataset into tasks of ``CLASSES_PER_TASK`` classes; ``--train-size`` random train images each."""
    images = load_images(args)
    train_images, train_labels, class_names = images["train"]
    test_images, test_labels, _ = images["test"]
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
                name="/".join(class_names[c] for c in classes if c < len(class_names)),
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


def num_classes_of(tasks: list[Task]) -> int:
    return max(max(task.classes) for task in tasks) + 1


@torch.no_grad()
def record_accuracies(
    model: nn.Module,
    tasks: list,
    index: int,
    matrix: AccuracyMatrix,
    timings: dict[str, float],
    label: str,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Evaluate ``model`` on every task's test images (on the CPU, where the test tensors are), record the row of
    the accuracy matrix after task ``index``, time it and log it."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    model.cpu()
    accuracies = [accuracy(model, t.test_images, t.test_labels, prepare=prepare) for t in tasks]
    model.to(device)
    matrix.record(after_task=index, accuracies=accuracies)
    name = tasks[index].name
    timings[f"evaluate after {name}"] = time.perf_counter() - start
    row = ", ".join(f"{t.name} {acc:.4f}" for t, acc in zip(tasks, accuracies, strict=True))
    logger.info(f"[{label}] accuracy after {name}: {row}")


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Fraction of ``images`` whose argmax over all classes of the head is the label (``prepare`` maps a batch of
    28 x 28 images to the model's inputs)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        output = model(prepare(batch) if prepare is not None else batch)
        logits = output if isinstance(output, torch.Tensor) else output.logits
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
    model = get_peft_model(SmallCNN(num_classes_of(tasks)), config)
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

        record_accuracies(model, tasks, index, matrix, timings, label)

        if remember:
            start = time.perf_counter()
            summary = model.remember(task.train_images)
            timings[f"remember {task.name}"] = time.perf_counter() - start
            logger.info(f"[{label}] anchors per task: {summary['anchors_per_task']}")
    return RunResult(matrix=matrix, model=model, timings=timings)


class ImageTask(Dataset):
    """A task's training images as ``{"pixel_values", "labels"}`` rows for ``Trainer``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, prepare: Callable | None) -> None:
        self.images, self.labels, self.prepare = images, labels, prepare

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        if self.prepare is not None:
            image = self.prepare(image[None])[0]
        return {"pixel_values": image, "labels": self.labels[index]}


def image_classifier(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, Callable | None]:
    """The tiny ViT, or ``--model`` with a function that resizes and normalises 28 x 28 grey batches for it."""
    if args.model is None:
        return tiny_vit(num_classes), None
    config = AutoConfig.from_pretrained(args.model)
    model = AutoModelForImageClassification.from_pretrained(
        args.model, num_labels=num_classes, ignore_mismatched_sizes=True
    )
    processor = AutoImageProcessor.from_pretrained(args.model)
    size = getattr(config, "image_size", 224)
    channels = getattr(config, "num_channels", 3)
    mean = torch.tensor(getattr(processor, "image_mean", None) or [0.5] * channels).view(1, -1, 1, 1)
    std = torch.tensor(getattr(processor, "image_std", None) or [0.5] * channels).view(1, -1, 1, 1)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return (images.expand(-1, channels, -1, -1) - mean[:, :channels]) / std[:, :channels]

    return model, prepare


def run_continual_trainer(args: argparse.Namespace, tasks: list[Task], *, remember: bool) -> RunResult:
    """``--arch vit``: train the tasks in order through ``fip_peft.FIPTrainer``; ``remember=False`` is plain
    fine-tuning of the same adapter."""
    label = "FIP" if remember else "baseline"
    torch.manual_seed(args.seed)
    base, prepare = image_classifier(args, num_classes_of(tasks))
    config_kwargs = {"beta": args.beta} if args.beta is not None else {}
    # Every Linear and Conv2d layer but the head: the patch projection and every attention and MLP layer.
    targets = [
        name
        for name, module in base.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name.split(".")[-1] != "classifier"
    ]
    config = fip_peft.FIPConfig(
        target_modules=targets,
        exclude_modules=["classifier"],
        modules_to_save=["classifier"],
        rank=args.rank,
        anchor_budget=args.anchors,
        anchor_seed=args.seed,
        **config_kwargs,
    )
    model = get_peft_model(base, config)
    if remember:
        logger.info(f"FIP config: beta={config.beta}, rank={config.rank}, anchor_budget={config.anchor_budget}.")
    model.print_trainable_parameters()
    matrix = AccuracyMatrix(task_names=[task.name for task in tasks])
    timings: dict[str, float] = {}
    anchor_picks = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        for index, task in enumerate(tasks):
            start = time.perf_counter()
            training = TrainingArguments(
                output_dir=scratch,
                max_steps=args.steps_per_task,
                per_device_train_batch_size=args.batch_size,
                learning_rate=args.lr,
                weight_decay=0.01,
                # No clipping, as in the CNN's plain loop (FIPTrainer would clip the combined task + anchor gradient).
                max_grad_norm=0.0,
                logging_steps=max(1, args.steps_per_task // 4),
                save_strategy="no",
                report_to=[],
                seed=args.seed + index,
                use_cpu=not torch.cuda.is_available(),
            )
            trainer = fip_peft.FIPTrainer(
                model=model, args=training, train_dataset=ImageTask(task.train_images, task.train_labels, prepare)
            )
            trainer.train()
            timings[f"train {task.name}"] = time.perf_counter() - start

            record_accuracies(model, tasks, index, matrix, timings, label, prepare=prepare)

            if remember:
                start = time.perf_counter()
                # The anchors are chosen from at most `anchor_budget` images, prepared only for those.
                picks = torch.randperm(len(task.train_images), generator=anchor_picks)[: args.anchors]
                images = task.train_images[picks]
                summary = model.remember({"pixel_values": prepare(images) if prepare is not None else images})
                timings[f"remember {task.name}"] = time.perf_counter() - start
                logger.info(f"[{label}] anchors per task: {summary['anchors_per_task']}")
    model.cpu()
    return RunResult(matrix=matrix, model=model, timings=timings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=(
            "Class-incremental split Fashion-MNIST (5 tasks of 2 classes, one shared 10-way head) on a small CNN "
            "with a FIP adapter (functionally invariant paths, arXiv 2205.00334): train each task in turn, remember "
            "it, and report the accuracy matrix R[i][j] (task j after training task i) with ACC, BWT and forgetting."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--arch",
        choices=("cnn", "vit"),
        default="cnn",
        help="'cnn': the small CNN in a plain PyTorch loop (create_fip_optimizer); 'vit': a tiny ViT (ViTConfig) "
        "through fip_peft.FIPTrainer.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="With --arch vit: name or path of a pretrained image classifier (AutoModelForImageClassification; "
        "its head is resized to the dataset's classes) instead of the tiny ViT. Hub names need the Hub "
        "(unset HF_HUB_OFFLINE).",
    )
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"'{DEFAULT_DATASET}' (Debian dataset-fashion-mnist), or a dataset name or path for "
        "datasets.load_dataset with an image and a label column (images made 28 x 28 grey; tasks of 2 classes by "
        "sorted label value).",
    )
    parser.add_argument("--image-column", default="image", help="Image column of a --dataset loaded by name.")
    parser.add_argument("--label-column", default="label", help="Label column of a --dataset loaded by name.")
    parser.add_argument(
        "--max-steps",
        "--steps-per-task",
        dest="steps_per_task",
        type=int,
        default=200,
        help="Optimizer steps per task.",
    )
    parser.add_argument(
        "--per-device-train-batch-size",
        "--batch-size",
        dest="batch_size",
        type=int,
        default=64,
        help="Training batch size.",
    )
    parser.add_argument("--learning-rate", "--lr", dest="lr", type=float, default=1e-3, help="Learning rate (AdamW).")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help=f"FIPConfig.beta, the weight of the new task against keeping remembered outputs; larger preserves "
        f"less. Default: FIPConfig's, {DEFAULT_BETA_FULL_RANK} full rank, {DEFAULT_BETA_LOW_RANK} low rank.",
    )
    parser.add_argument("--rank", type=int, default=None, help="Rank of the FIP displacement. Default: full rank.")
    parser.add_argument(
        "--anchor-budget",
        "--anchors",
        dest="anchors",
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
    args = parser.parse_args(argv)
    if args.model is not None and args.arch != "vit":
        parser.error("--model applies to --arch vit (the CNN is built here); add --arch vit or drop --model.")
    return args


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

    run = run_continual_trainer if args.arch == "vit" else run_continual
    fip = run(args, tasks, remember=True)
    fip.timings = {"load data": data_seconds, **fip.timings}
    start = time.perf_counter()
    written = save_matrix(fip.matrix, output_dir, "FIP")
    adapter_dir = output_dir / "adapter"
    fip.model.save_pretrained(adapter_dir)
    fip.timings["save"] = time.perf_counter() - start

    baseline = run(args, tasks, remember=False) if args.baseline else None
    if baseline is not None:
        written += save_matrix(baseline.matrix, output_dir / "baseline", "plain fine-tuning")

    print_report(fip, baseline, num_classes_of(tasks), [*written, adapter_dir], time.perf_counter() - total_start)


if __name__ == "__main__":
    main()
