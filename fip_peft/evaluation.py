"""Continual-learning evaluation: accuracy matrices, ACC / BWT / forgetting, per-task accuracy and plots.

The accuracy matrix ``R`` is ``T x T`` with ``R[i][j]`` the accuracy on task ``j`` after training task ``i``. Entries
above the diagonal (tasks not trained yet) may be NaN and are never used by the measures below.

This module imports nothing else from ``fip_peft`` so it can be used, and tested, on its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.utils import logging

from .model_io import forward_input_names, model_output

if TYPE_CHECKING:
    import evaluate

logger = logging.get_logger(__name__)

ACCURACY_METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "accuracy"

MatrixLike = Sequence[Sequence[float]] | np.ndarray | torch.Tensor


def _as_matrix(matrix: MatrixLike, name: str = "R") -> np.ndarray:
    """Return ``matrix`` as a float64 array after checking that it is a non-empty square matrix."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    try:
        array = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be a square matrix of numbers (ragged rows or non-numbers given).") from error
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[0] != array.shape[1]:
        raise ValueError(f"`{name}` must be a non-empty square T x T matrix, got shape {array.shape}.")
    return array


def _check_lower_triangle(array: np.ndarray, name: str) -> None:
    """Raise if an entry on or below the diagonal (an accuracy the measures need) is NaN."""
    lower = array[np.tril_indices(array.shape[0])]
    if np.isnan(lower).any():
        raise ValueError(f"`{name}` has NaN on or below the diagonal; only entries above it may be missing.")


def average_accuracy(R: MatrixLike) -> float:
    """ACC: mean accuracy over all tasks after training the last one (mean of the last row)."""
    array = _as_matrix(R, "R")
    _check_lower_triangle(array, "R")
    return float(array[-1].mean())


def backward_transfer(R: MatrixLike) -> float:
    """BWT: mean change in accuracy on each earlier task between learning it and the end; negative means forgetting."""
    array = _as_matrix(R, "R")
    _check_lower_triangle(array, "R")
    num_tasks = array.shape[0]
    if num_tasks == 1:
        return 0.0
    earlier = np.arange(num_tasks - 1)
    return float((array[-1, earlier] - array[earlier, earlier]).mean())


def forgetting(R: MatrixLike) -> float:
    """Average forgetting (Chaudhry et al., 2018): mean drop from each earlier task's best accuracy to its final one.

    For task ``i`` the best accuracy is taken over ``i <= l < T - 1`` (the rows after it was learned), so entries
    above the diagonal are ignored. As in the paper the drop is not clipped, so it is negative when a task ends up
    better than it ever was before. Returns 0.0 when ``T == 1``.
    """
    array = _as_matrix(R, "R")
    _check_lower_triangle(array, "R")
    num_tasks = array.shape[0]
    if num_tasks == 1:
        return 0.0
    drops = [array[i : num_tasks - 1, i].max() - array[-1, i] for i in range(num_tasks - 1)]
    return float(np.mean(drops))


def _nan_to_none(value: float) -> float | None:
    """JSON has no NaN: store missing accuracies as null."""
    return None if value is None or math.isnan(value) else float(value)


def _none_to_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


@dataclass
class AccuracyMatrix:
    """An accuracy matrix filled row by row during continual training, with its ACC / BWT / forgetting.

    ``matrix[i][j]`` is the accuracy on task ``j`` after training task ``i``; rows have one entry per task and missing
    entries (tasks not evaluated) are NaN. The measures use the square block of the rows recorded so far.
    """

    task_names: list[str]
    matrix: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.task_names = [str(name) for name in self.task_names]
        if not self.task_names:
            raise ValueError("`task_names` must name at least one task.")
        if len(self.matrix) > self.num_tasks or any(len(row) != self.num_tasks for row in self.matrix):
            raise ValueError(f"`matrix` must have at most {self.num_tasks} rows of {self.num_tasks} entries each.")
        self.matrix = [[float(value) for value in row] for row in self.matrix]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_recorded(self) -> int:
        """How many tasks have been trained (rows recorded) so far."""
        return len(self.matrix)

    def record(self, after_task: int, accuracies: Sequence[float]) -> None:
        """Store the accuracies on tasks ``0 .. len(accuracies) - 1`` measured after training task ``after_task``.

        Rows must be recorded in order; recording an existing row again overwrites it. Accuracies on tasks not given
        are stored as NaN. At least the tasks up to ``after_task`` must be given, since the measures need them.
        """
        if not 0 <= after_task < self.num_tasks:
            raise ValueError(f"`after_task` must be in [0, {self.num_tasks}), got {after_task}.")
        if after_task > self.num_recorded:
            raise ValueError(
                f"`after_task`={after_task} skips rows: record task {self.num_recorded} first (rows go in order)."
            )
        values = [float(value) for value in accuracies]
        if not after_task + 1 <= len(values) <= self.num_tasks:
            raise ValueError(
                f"`accuracies` must hold between {after_task + 1} and {self.num_tasks} values, got {len(values)}."
            )
        row = values + [float("nan")] * (self.num_tasks - len(values))
        if after_task == self.num_recorded:
            self.matrix.append(row)
        else:
            self.matrix[after_task] = row

    def as_array(self) -> np.ndarray:
        """The square block of recorded rows, ``num_recorded x num_recorded``."""
        count = self.num_recorded
        return np.asarray(self.matrix, dtype=np.float64).reshape(count, self.num_tasks)[:, :count]

    def _measure(self, function: Callable[[MatrixLike], float]) -> float:
        return float("nan") if self.num_recorded == 0 else function(self.as_array())

    @property
    def acc(self) -> float:
        """ACC over the tasks trained so far (NaN before the first record)."""
        return self._measure(average_accuracy)

    @property
    def bwt(self) -> float:
        """BWT over the tasks trained so far (NaN before the first record)."""
        return self._measure(backward_transfer)

    @property
    def forgetting(self) -> float:
        """Average forgetting over the tasks trained so far (NaN before the first record)."""
        return self._measure(forgetting)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: task names, matrix (NaN as null) and the three measures."""
        return {
            "task_names": list(self.task_names),
            "matrix": [[_nan_to_none(value) for value in row] for row in self.matrix],
            "acc": _nan_to_none(self.acc),
            "bwt": _nan_to_none(self.bwt),
            "forgetting": _nan_to_none(self.forgetting),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (parent folders are created) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        """Rebuild from :meth:`to_dict` output; the stored measures are recomputed, not read."""
        matrix = [[_none_to_nan(value) for value in row] for row in data.get("matrix", [])]
        return cls(task_names=list(data["task_names"]), matrix=matrix)

    @classmethod
    def from_json(cls, path: str | Path) -> AccuracyMatrix:
        """Read a file written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __str__(self) -> str:
        width = max(8, *(len(name) for name in self.task_names))
        label_width = width + len("after ")
        header = " " * label_width + " | " + " ".join(name.rjust(width) for name in self.task_names)
        lines = [header, "-" * len(header)]
        for name, row in zip(self.task_names, self.matrix, strict=False):
            cells = " ".join(("-" if math.isnan(value) else f"{value:.4f}").rjust(width) for value in row)
            lines.append(f"after {name}".ljust(label_width) + " | " + cells)
        lines.append(f"ACC={self.acc:.4f}  BWT={self.bwt:+.4f}  forgetting={self.forgetting:.4f}")
        return "\n".join(lines)


def load_accuracy_metric() -> evaluate.EvaluationModule:
    """Load the packaged accuracy metric with ``evaluate.load``; works offline unlike ``evaluate.load("accuracy")``."""
    import evaluate

    return evaluate.load(str(ACCURACY_METRIC_PATH))


def _prepare_hf_dataset(dataset: Any, model: nn.Module, label_key: str) -> tuple[Any, str]:
    """Format a ``datasets.Dataset`` to torch with the model's input columns plus the label column."""
    columns = list(dataset.column_names)
    if label_key not in columns:
        if label_key == "labels" and "label" in columns:
            label_key = "label"
        else:
            raise KeyError(f"Label column {label_key!r} not in dataset columns {columns}; pass `label_key`.")
    input_names = forward_input_names(model)
    inputs = [c for c in columns if c != label_key and c in input_names]
    if not inputs:
        raise ValueError(f"No dataset column matches an input of the model's forward (columns: {columns}).")
    return dataset.with_format("torch", columns=[*inputs, label_key]), label_key


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _default_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def evaluate_tasks(
    model: nn.Module,
    task_datasets: Sequence[Any],
    *,
    batch_size: int = 64,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: str | torch.device | None = None,
    label_key: str = "labels",
    progress: bool = True,
) -> list[float]:
    """Accuracy of ``model`` on each dataset in ``task_datasets`` (one row of the accuracy matrix).

    A dataset is a ``datasets.Dataset`` (formatted to torch with the columns named by ``model.forward`` plus the label
    column; ``"label"`` is used when ``"labels"`` is missing) or a torch ``Dataset`` yielding dicts or ``(x, y)``
    tuples. Dict batches are passed as keyword arguments without the label; tuple batches as ``model(x)``. The model
    runs in eval mode without gradients and gets its train/eval mode back afterwards.
    """
    device = torch.device(device) if device is not None else _default_device(model)
    metric = load_accuracy_metric()
    was_training = model.training
    model.eval()
    accuracies: list[float] = []
    try:
        with torch.no_grad():
            for index, dataset in enumerate(task_datasets):
                task_label_key = label_key
                if hasattr(dataset, "column_names") and hasattr(dataset, "with_format"):
                    dataset, task_label_key = _prepare_hf_dataset(dataset, model, label_key)
                if len(dataset) == 0:
                    logger.warning("Task %d has an empty dataset; its accuracy is NaN.", index)
                    accuracies.append(float("nan"))
                    continue
                loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
                for batch in tqdm(loader, desc=f"Evaluating task {index}", disable=not progress, leave=False):
                    if isinstance(batch, Mapping):
                        batch = dict(batch)
                        if task_label_key not in batch:
                            raise KeyError(f"Batch of task {index} has no {task_label_key!r} key; pass `label_key`.")
                        labels = batch.pop(task_label_key)
                        outputs = model(**_to_device(batch, device))
                    else:
                        inputs, labels = batch[0], batch[1]
                        outputs = model(_to_device(inputs, device))
                    predictions = model_output(outputs).argmax(dim=-1)
                    metric.add_batch(
                        predictions=predictions.reshape(-1).cpu().numpy(),
                        references=torch.as_tensor(labels).reshape(-1).cpu().numpy(),
                    )
                accuracies.append(float(metric.compute()["accuracy"]))
    finally:
        model.train(was_training)
    return accuracies


def plot_accuracy_matrix(
    R: MatrixLike,
    path: str | Path,
    task_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Save ``R`` as an annotated heatmap PNG at ``path``, with ACC and BWT in the title; returns the path.

    Matplotlib is imported here (with the Agg canvas, no pyplot) so the package itself does not need it.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_accuracy_matrix needs matplotlib: `pip install matplotlib`.") from error

    array = _as_matrix(R, "R")
    num_tasks = array.shape[0]
    names = [str(name) for name in task_names] if task_names is not None else [f"T{i}" for i in range(num_tasks)]
    if len(names) != num_tasks:
        raise ValueError(f"`task_names` has {len(names)} names for a {num_tasks} x {num_tasks} matrix.")

    figure = Figure(figsize=(1.2 * num_tasks + 2.5, 1.0 * num_tasks + 2.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(array), vmin=0.0, vmax=1.0, cmap="viridis")
    figure.colorbar(image, ax=axes, label="accuracy")
    for i in range(num_tasks):
        for j in range(num_tasks):
            if not math.isnan(array[i, j]):
                color = "black" if array[i, j] > 0.6 else "white"
                axes.text(j, i, f"{array[i, j]:.2f}", ha="center", va="center", color=color, fontsize=9)
    axes.set_xticks(range(num_tasks), labels=names, rotation=45, ha="right")
    axes.set_yticks(range(num_tasks), labels=[f"after {name}" for name in names])
    axes.set_xlabel("evaluated task")
    axes.set_ylabel("trained through")
    summary = f"ACC={average_accuracy(array):.3f}  BWT={backward_transfer(array):+.3f}"
    axes.set_title(f"{title}\n{summary}" if title else summary)
    figure.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def task_history(task_names: list[str], anchors_per_task: list[int]) -> list[tuple[str, int | None]]:
    """(name, anchors kept) of every task of an adapter's history, as the model card and `fip-peft info` show it.
    Tasks remembered without a name are "task <i>"; the anchors of the first tasks are None when the adapter was
    once saved without anchors (`save_anchors=False`) and the later tasks were remembered after loading it."""
    names = list(task_names) + [f"task {i}" for i in range(len(task_names), len(anchors_per_task))]
    offset = len(names) - len(anchors_per_task)  # tasks before `offset` lost their anchors
    return [(name, anchors_per_task[i - offset] if i >= offset else None) for i, name in enumerate(names)]
