"""Soak test: 10 sequential tasks on the vision example with a save and a reload between every two tasks.

The tasks are split Fashion-MNIST's 5 two-class tasks (examples/continual_vision.py's setup and ``SmallCNN``), then
the same 5 again with a fixed random pixel permutation (10 tasks, one shared 10-way head). After each task the
script remembers it, saves the adapter over the previous one (atomic save), loads it into a fresh copy of the base
model and continues training the loaded model with a new FIP optimizer. It checks, after every task:

- anchors stay within ``anchor_budget`` and every remembered task keeps at least one;
- the reloaded model's outputs on a probe batch, its anchors and its reference outputs are identical (bit for bit)
  to those of the model that was saved;
- the process's resident memory (RSS, after garbage collection) does not grow across tasks: the growth from the
  end of task ``--warmup-tasks`` to the end of the last task must stay under ``--rss-tolerance-mb``;
- no optimizer step was skipped for NaN/inf values and no temporary save folder is left behind.

Not part of CI. Run from the repository root (Fashion-MNIST from ``apt-get install -y dataset-fashion-mnist``)::

    python benchmarks/soak.py                 # 10 tasks x 100 steps
    python benchmarks/soak.py --steps-per-task 20 --output-dir /tmp/soak
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

import psutil
import torch
from peft import PeftModel, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from continual_vision import SmallCNN  # noqa: E402
from data import load_fashion_mnist, split_tasks  # noqa: E402

import fip_peft  # noqa: E402
from fip_peft.evaluation import AccuracyMatrix  # noqa: E402

CLASSES_PER_TASK = 2
TARGETS = ["conv1", "conv2", "fc1"]


class SkipCounter(logging.Handler):
    """Counts the warnings of skipped (NaN/inf) FIP steps."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.skipped = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.skipped += "skipped" in record.getMessage()


def build_tasks(train_size: int, seed: int) -> list[dict]:
    """5 split tasks, then the same 5 with one fixed pixel permutation: 10 tasks of (name, train/test images)."""
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(28 * 28, generator=generator)
    tasks = []
    for permuted in (False, True):
        for index, (train_index, test_index) in enumerate(
            zip(split_tasks(train_labels, CLASSES_PER_TASK), split_tasks(test_labels, CLASSES_PER_TASK), strict=True)
        ):
            train_index = torch.from_numpy(train_index)
            train_index = train_index[torch.randperm(len(train_index), generator=generator)[:train_size]]
            test_index = torch.from_numpy(test_index)

            def view(images: torch.Tensor, permuted: bool = permuted) -> torch.Tensor:
                return images.flatten(1)[:, permutation].view_as(images) if permuted else images

            tasks.append(
                {
                    "name": f"{'permuted ' if permuted else ''}classes {2 * index}-{2 * index + 1}",
                    "train_images": view(train_images[train_index]),
                    "train_labels": train_labels[train_index],
                    "test_images": view(test_images[test_index]),
                    "test_labels": test_labels[test_index],
                }
            )
    return tasks


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(images[s : s + 1000]).argmax(-1) == labels[s : s + 1000]).sum())
        for s in range(0, len(images), 1000)
    )
    return correct / len(images)


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 1024**2


def reload(adapter_dir: Path, base_state: dict) -> PeftModel:
    base = SmallCNN()
    base.load_state_dict(base_state)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def identical_memory(a, b) -> bool:
    same_inputs = a.inputs.keys() == b.inputs.keys() and all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    return same_inputs and torch.equal(a.reference, b.reference) and torch.equal(a.task_ids, b.task_ids)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    tasks = build_tasks(args.train_size, args.seed)
    output_dir = Path(args.output_dir)
    adapter_dir = output_dir / "adapter"
    base = SmallCNN()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    config = fip_peft.FIPConfig(target_modules=TARGETS, modules_to_save=["head"], anchor_budget=args.anchors)
    model = get_peft_model(base, config)
    skips = SkipCounter()
    logging.getLogger("fip_peft").addHandler(skips)
    probe = torch.cat([task["test_images"][:20] for task in tasks])
    generator = torch.Generator().manual_seed(args.seed)
    matrix = AccuracyMatrix(task_names=[task["name"] for task in tasks])
    rows = []
    for index, task in enumerate(tasks):
        start = time.perf_counter()
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=args.lr)
        model.train()
        for _ in range(args.steps_per_task):
            batch = torch.randint(len(task["train_images"]), (args.batch_size,), generator=generator)
            loss = nn.functional.cross_entropy(model(task["train_images"][batch]), task["train_labels"][batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        train_seconds = time.perf_counter() - start
        matrix.record(
            after_task=index, accuracies=[accuracy(model, t["test_images"], t["test_labels"]) for t in tasks]
        )
        summary = model.remember(task["train_images"])

        start = time.perf_counter()
        model.save_pretrained(adapter_dir)
        save_seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            expected = model(probe)
        memory = model.base_model.memory()
        del optimizer
        start = time.perf_counter()
        loaded = reload(adapter_dir, base_state)
        load_seconds = time.perf_counter() - start
        with torch.no_grad():
            got = loaded.eval()(probe)
        row = {
            "task": task["name"],
            "anchors_per_task": summary["anchors_per_task"],
            "anchors": summary["total"],
            "max_abs_logit_diff_after_reload": float((got - expected).abs().max()),
            "memory_identical_after_reload": identical_memory(memory, loaded.base_model.memory()),
            "rss_mb": None,
            "train_s": round(train_seconds, 2),
            "save_s": round(save_seconds, 3),
            "load_s": round(load_seconds, 3),
            "leftover_temp_folders": sorted(p.name for p in output_dir.iterdir() if p.name.endswith(".tmp")),
        }
        model = loaded  # continue from what was loaded, as a resumed run would
        del memory, loaded
        row["rss_mb"] = round(rss_mb(), 1)
        rows.append(row)
        print(
            f"task {index} {task['name']:<26} anchors {row['anchors']:>4} {row['anchors_per_task']} "
            f"reload max|dlogit| {row['max_abs_logit_diff_after_reload']:.1e} memory same "
            f"{row['memory_identical_after_reload']} RSS {row['rss_mb']:.1f} MB train {row['train_s']:.1f}s "
            f"save {row['save_s']:.3f}s load {row['load_s']:.3f}s",
            flush=True,
        )
    logging.getLogger("fip_peft").removeHandler(skips)

    warm = rows[args.warmup_tasks - 1]["rss_mb"]
    growth = rows[-1]["rss_mb"] - warm
    checks = {
        "anchors within budget, >= 1 per task": all(
            r["anchors"] <= args.anchors and len(r["anchors_per_task"]) == i + 1 and min(r["anchors_per_task"]) >= 1
            for i, r in enumerate(rows)
        ),
        "outputs identical after every reload": all(r["max_abs_logit_diff_after_reload"] == 0.0 for r in rows),
        "anchor memory identical after every reload": all(r["memory_identical_after_reload"] for r in rows),
        f"RSS growth after task {args.warmup_tasks} < {args.rss_tolerance_mb} MB": growth < args.rss_tolerance_mb,
        "no skipped (NaN/inf) steps": skips.skipped == 0,
        "no temporary save folders left": not any(r["leftover_temp_folders"] for r in rows),
    }
    result = {
        "args": vars(args),
        "tasks": rows,
        "rss_growth_mb_after_warmup": round(growth, 1),
        "skipped_steps": skips.skipped,
        "accuracy_matrix": matrix.to_dict(),
        "acc": round(matrix.acc, 4),
        "bwt": round(matrix.bwt, 4),
        "checks": checks,
    }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps-per-task", type=int, default=100, help="Optimizer steps per task.")
    parser.add_argument("--batch-size", type=int, default=64, help="Training batch size.")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate.")
    parser.add_argument("--anchors", type=int, default=200, help="FIPConfig.anchor_budget over all 10 tasks.")
    parser.add_argument("--train-size", type=int, default=2000, help="Training images per task.")
    parser.add_argument("--warmup-tasks", type=int, default=2, help="Tasks before RSS growth is measured.")
    parser.add_argument("--rss-tolerance-mb", type=float, default=50.0, help="Largest RSS growth that passes.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data subsets, permutation and batches.")
    parser.add_argument("--output-dir", default="outputs/soak", help="Where the adapter and soak.json go.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    result = run(args)
    result["total_s"] = round(time.perf_counter() - start, 1)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "soak.json").write_text(json.dumps(result, indent=1))
    print(
        f"ACC {result['acc']:.4f} BWT {result['bwt']:+.4f}; RSS growth after task {args.warmup_tasks}: "
        f"{result['rss_growth_mb_after_warmup']} MB; skipped steps: {result['skipped_steps']}; "
        f"total {result['total_s']} s"
    )
    for name, ok in result["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if not all(result["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
