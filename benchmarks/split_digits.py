"""Which output distance keeps 5-task class-incremental split digits best: the evidence for `distance="logits"`.

scikit-learn's 8x8 digits split into 5 tasks of 2 classes, one shared 10-way head (trained in full), an MLP whose
hidden layers carry a full-rank FIP adapter; each task trains 150 AdamW steps (lr 3e-3) and is then remembered
(100 anchors in all). Reported: ACC and BWT (mean and spread over seeds) for plain fine-tuning, FIP with each
distance at this package's default beta, and the authors' recipe (Bhattacharyya, beta 1).

    python benchmarks/split_digits.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import fip_peft  # noqa: E402
from fip_peft.apps.evaluation import average_accuracy, backward_transfer  # noqa: E402
from tests._tasks import MLP, accuracy, run_steps  # noqa: E402

TASKS = [(2 * t, 2 * t + 1) for t in range(5)]
METHODS = {
    "plain fine-tuning": None,
    "FIP logits (default)": {"distance": "logits"},
    "FIP kl (default beta)": {"distance": "kl"},
    "FIP bhattacharyya (default beta)": {"distance": "bhattacharyya"},
    "FIP bhattacharyya, beta 1 (authors)": {"distance": "bhattacharyya", "beta": 1.0},
    "FIP natural+penalty": {"solver": "natural+penalty"},
    "FIP natural": {"solver": "natural"},
    "FIP projection+penalty": {"solver": "projection+penalty"},
    "FIP projection": {"solver": "projection"},
}


def split_digits(validation: bool = False) -> tuple[torch.Tensor, ...]:
    """Train and test split (80/20); with `validation` the last quarter of the training split is scored instead of
    the test split (and not trained on), for choosing settings."""
    data = load_digits()
    x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    if validation:
        held = int(0.75 * split)
        return x[:held], y[:held], x[held:split], y[held:split]
    return x[:split], y[:split], x[split:], y[split:]


def run(method: dict | None, seed: int, data: tuple, steps: int, lr: float, budget: int) -> list[list[float]]:
    """Train the 5 tasks in turn; return the accuracy matrix R."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    config = fip_peft.FIPConfig(
        target_modules=["fc1", "fc2"], modules_to_save=["head"], anchor_budget=budget, **(method or {})
    )
    model = get_peft_model(MLP(), config)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=lr)
    matrix = []
    for index, classes in enumerate(TASKS):
        rows = (y_train == classes[0]) | (y_train == classes[1])
        run_steps(model, optimizer, x_train[rows], y_train[rows], steps, seed=seed * 10 + index)
        row = []
        for other in TASKS:
            test_rows = (y_test == other[0]) | (y_test == other[1])
            row.append(accuracy(model, x_test[test_rows], y_test[test_rows]))
        matrix.append(row)
        if method is not None:
            model.remember(x_train[rows])
    return matrix


def _parse_value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(text, text)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--anchors", type=int, default=100)
    parser.add_argument(
        "--validation",
        action="store_true",
        help="Score on a held-out quarter of the training split, not the test split.",
    )
    parser.add_argument("--methods", help=f"Comma-separated method names (default: all): {', '.join(METHODS)}.")
    parser.add_argument(
        "--fip-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Override a FIPConfig field for every FIP method (repeatable), e.g. damping=0.01.",
    )
    args = parser.parse_args()
    options = {}
    for option in args.fip_option:
        key, _, value = option.partition("=")
        options[key] = _parse_value(value)
    names = list(METHODS) if not args.methods else [n.strip() for n in args.methods.split(",")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}.")
    data = split_digits(args.validation)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'method':<38}{'ACC':>16}{'BWT':>18}")
    for name in names:
        method = METHODS[name]
        if method is not None:
            method = {**method, **options}
        accs, bwts = [], []
        for seed in seeds:
            matrix = run(method, seed, data, args.steps, args.lr, args.anchors)
            accs.append(average_accuracy(matrix))
            bwts.append(backward_transfer(matrix))
        print(
            f"{name:<38}{statistics.mean(accs):>9.3f} ± {_spread(accs):.3f}"
            f"{statistics.mean(bwts):>+11.3f} ± {_spread(bwts):.3f}"
        )


if __name__ == "__main__":
    main()
