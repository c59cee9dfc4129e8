"""Printing and saving the results of the continual-learning examples (shared by the example scripts)."""

from __future__ import annotations

from pathlib import Path

from fip_peft.evaluation import AccuracyMatrix, plot_accuracy_matrix


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
