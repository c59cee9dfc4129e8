"""The accuracy matrix of continual learning and its measures: ACC, BWT and forgetting, and an adapter's task history.

The accuracy matrix ``R`` is ``T x T`` with ``R[i][j]`` the accuracy on task ``j`` after training task ``i``. Entries
above the diagonal (tasks not trained yet) may be NaN and are never used by the measures below. `FIPModel` keeps one
per adapter (`record_accuracy`) and the model card prints it; the loops that fill it are in
`fip_peft.apps.evaluation`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def task_history(task_names: list[str], anchors_per_task: list[int]) -> list[tuple[str, int | None]]:
    """(name, anchors kept) of every task of an adapter's history, as the model card and `fip-peft info` show it.
    Tasks remembered without a name are "task <i>"; the anchors of the first tasks are None when the adapter was
    once saved without anchors (`save_anchors=False`) and the later tasks were remembered after loading it."""
    names = list(task_names) + [f"task {i}" for i in range(len(task_names), len(anchors_per_task))]
    offset = len(names) - len(anchors_per_task)  # tasks before `offset` lost their anchors
    return [(name, anchors_per_task[i - offset] if i >= offset else None) for i, name in enumerate(names)]
