"""Printing and saving the results of the continual-learning examples (shared by the example scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fip_peft.apps.evaluation import AccuracyMatrix, plot_accuracy_matrix


def side_by_side(left: str, right: str, left_title: str, right_title: str, gap: int = 4) -> str:
    """Two multi-line blocks next to each other, each under its title."""
    left_lines = [left_title, *left.splitlines()]
    right_lines = [right_title, *right.splitlines()]
    width = max(len(line) for line in left_lines) + gap
    rows = max(len(left_lines), len(right_lines))
    left_lines += [""] * (rows - len(left_lines))
    right_lines += [""] * (rows - len(right_lines))
    return "\n".join(f"{a.ljust(width)}{b}".rstrip() for a, b in zip(left_lines, right_lines, strict=True))


def save_matrix(matrix: AccuracyMatrix, folder: Path, title: str) -> list[Path]:
    """Write ``R.json`` and the ``R.png`` heatmap of ``matrix`` into ``folder``."""
    json_path = matrix.to_json(folder / "R.json")
    png_path = plot_accuracy_matrix(matrix.as_array(), folder / "R.png", task_names=matrix.task_names, title=title)
    return [json_path, png_path]


def print_timings(title: str, timings: dict[str, float]) -> None:
    print(f"\n{title} time per phase:")
    for phase, seconds in timings.items():
        print(f"  {phase:<32} {seconds:7.1f} s")
    print(f"  {'total':<32} {sum(timings.values()):7.1f} s")


def print_report(fip: Any, baseline: Any | None, num_classes: int, written: list[Path], wall_seconds: float) -> None:
    """Print the accuracy matrices (side by side with the baseline's when there is one), timings and outputs.

    `fip` and `baseline` are run results with an `AccuracyMatrix` in `.matrix` and phase timings in `.timings`.
    """
    print("\nAccuracy matrix R[i][j]: accuracy on task j (columns) after training task i (rows).")
    print(f"Class-incremental: argmax over all {num_classes} classes of the shared head.\n")
    if baseline is None:
        print("FIP\n" + str(fip.matrix))
    else:
        print(side_by_side(str(fip.matrix), str(baseline.matrix), "FIP", "plain fine-tuning (no remember)"))
    print_timings("FIP", fip.timings)
    if baseline is not None:
        print_timings("Baseline", baseline.timings)
    print(f"\nWall time: {wall_seconds:.1f} s")
    print("Wrote:")
    for path in written:
        print(f"  {path}")
