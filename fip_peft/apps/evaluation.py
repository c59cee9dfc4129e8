"""Continual-learning evaluation: per-task accuracy of a model on a sequence of tasks, and accuracy-matrix plots.

The accuracy matrix and its measures (ACC, BWT, forgetting) are `fip_peft.method.accuracy`'s; they are importable from
here too, beside the loops that fill them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.utils import logging

from ..method.accuracy import (  # noqa: F401 - the evaluation API in one place
    AccuracyMatrix,
    MatrixLike,
    _as_matrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    task_history,
)
from ..method.model_io import forward_input_names, model_output

if TYPE_CHECKING:
    import evaluate

logger = logging.get_logger(__name__)

ACCURACY_METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "accuracy"


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
