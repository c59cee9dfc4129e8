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

Two fault cases follow (``--cases`` picks which of the three parts run):

- ``checkpoint-kills``: a ``FIPTrainer`` run that checkpoints every step (task 1, anchors of task 0) is SIGKILLed
  ``--checkpoint-kills`` times, each time at a random moment within ``--kill-window`` seconds after the folder of a
  checkpoint past the newest one so far appears, so that many kills land while a checkpoint is written;
  every restart resumes with ``resume_from_checkpoint=True``.
  Checks: every restart resumed (from the newest complete checkpoint, skipping a partial one), the last run reaches
  ``--kill-steps``, and no staging folder of a killed save is left once it has saved;
- ``divergence``: SGD at ``--diverge-lr`` diverges; the run must stop with ``NonFiniteStepError`` after
  ``FIPConfig.max_consecutive_skips`` (``--skip-limit``) skipped steps in a row, ``save_pretrained`` must refuse
  the diverged adapter, and the last good adapter saved before must still load with the same outputs.

Not part of CI. Run from the repository root (Fashion-MNIST from ``apt-get install -y dataset-fashion-mnist``)::

    python benchmarks/soak.py                 # 10 tasks x 100 steps
    python benchmarks/soak.py --steps-per-task 20 --output-dir /tmp/soak
    python benchmarks/soak.py --cases checkpoint-kills divergence --checkpoint-kills 5
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import gc
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from continual_vision import SmallCNN  # noqa: E402
from data import load_fashion_mnist, split_tasks  # noqa: E402

import fip_peft  # noqa: E402
from fip_peft.apps.evaluation import AccuracyMatrix  # noqa: E402
from fip_peft.integrations.trainer import _checkpoint_problem  # noqa: E402
from fip_peft.method.checks import NonFiniteStepError  # noqa: E402

CLASSES_PER_TASK = 2
TARGETS = ["conv1", "conv2", "fc1"]
CASES = ("tasks", "checkpoint-kills", "divergence")


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


# ---- fault cases -----------------------------------------------------------------------------------------------


class LossCNN(SmallCNN):
    """`SmallCNN` returning a loss, as `Trainer` expects."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = super().forward(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.images[index], "labels": self.labels[index]}


def staging_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def checkpoint_child(args: argparse.Namespace) -> None:
    """One `FIPTrainer` run (task 1, anchors of task 0) that checkpoints every step into `args.checkpoint_child`,
    resuming from the newest complete checkpoint when there is one; the parent kills it at random moments."""
    tasks = build_tasks(args.train_size, args.seed)[:2]
    torch.manual_seed(args.seed)
    config = fip_peft.FIPConfig(target_modules=TARGETS, modules_to_save=["head"], anchor_budget=args.anchors)
    model = get_peft_model(LossCNN(), config)
    model.remember(tasks[0]["train_images"])
    out = Path(args.checkpoint_child)
    training = TrainingArguments(
        output_dir=str(out),
        max_steps=args.kill_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = fip_peft.FIPTrainer(
        model=model, args=training, train_dataset=Images(tasks[1]["train_images"], tasks[1]["train_labels"])
    )
    resume = out.is_dir() and any(p.name.startswith("checkpoint-") for p in out.iterdir())
    trainer.train(resume_from_checkpoint=True if resume else None)
    print(json.dumps({"global_step": trainer.state.global_step}), flush=True)


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def run_checkpoint_kills(args: argparse.Namespace, output_dir: Path) -> dict:
    """SIGKILL a checkpointing `FIPTrainer` run `args.checkpoint_kills` times, restarting it each time, then let it
    finish; see the module docstring."""
    out = output_dir / "checkpoint_kills"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(args.seed)
    child_args = [
        sys.executable, __file__, "--checkpoint-child", str(out), "--kill-steps", str(args.kill_steps),
        "--train-size", str(args.train_size), "--anchors", str(args.anchors), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--seed", str(args.seed),
    ]  # fmt: skip
    trials = []
    for _ in range(args.checkpoint_kills):
        reached = max((int(p.name.split("-")[-1]) for p in checkpoints(out)), default=0)
        child = subprocess.Popen(child_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while child.poll() is None and time.monotonic() < deadline:  # a checkpoint past the last one is being written
            if any(int(p.name.split("-")[-1]) > reached for p in checkpoints(out)):
                break
            time.sleep(0.002)
        delay = rng.uniform(0.0, args.kill_window)
        time.sleep(delay)
        finished = child.poll() is not None
        if not finished:
            child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate()
        found = checkpoints(out)
        newest = found[-1] if found else None
        problem = _checkpoint_problem(str(newest)) if newest is not None else "no checkpoint"
        trials.append(
            {
                "kill_after_s": round(delay, 3),
                "exited_before_the_kill": finished,
                "returncode": child.returncode,
                "resumed_past_an_incomplete_checkpoint": "skipping the incomplete checkpoint" in stderr,
                "newest_checkpoint": newest.name if newest is not None else None,
                "newest_checkpoint_complete": problem is None,
                "staging_folders": staging_folders(out),
                "error": stderr.strip().splitlines()[-1] if finished and child.returncode else "",
            }
        )
        print(
            f"kill {len(trials)}: after {delay:.2f} s, newest {trials[-1]['newest_checkpoint']} complete "
            f"{problem is None}, staging folders {len(trials[-1]['staging_folders'])}",
            flush=True,
        )
    final = subprocess.run(child_args, capture_output=True, text=True, timeout=1800)
    steps = json.loads(final.stdout.strip().splitlines()[-1])["global_step"] if final.returncode == 0 else None
    result = {
        "trials": trials,
        "kills": sum(not t["exited_before_the_kill"] for t in trials),
        "killed_while_the_newest_checkpoint_was_incomplete": sum(not t["newest_checkpoint_complete"] for t in trials),
        "restarts_that_skipped_an_incomplete_checkpoint": sum(
            t["resumed_past_an_incomplete_checkpoint"] for t in trials
        )
        + ("skipping the incomplete checkpoint" in final.stderr),
        "most_staging_folders_left_by_a_kill": max((len(t["staging_folders"]) for t in trials), default=0),
        "final_returncode": final.returncode,
        "final_global_step": steps,
        "staging_folders_after_the_final_run": staging_folders(out),
        "final_error": final.stderr.strip().splitlines()[-1] if final.returncode else "",
    }
    result["checks"] = {
        "every restart after a kill resumed (no failed start)": all(
            not (t["exited_before_the_kill"] and t["returncode"]) for t in trials
        ),
        f"the last run resumed and reached step {args.kill_steps}": steps == args.kill_steps,
        "no staging folder left after the last run": not result["staging_folders_after_the_final_run"],
    }
    return result


def run_divergence(args: argparse.Namespace, output_dir: Path) -> dict:
    """SGD at `args.diverge_lr` until the run stops; see the module docstring."""
    tasks = build_tasks(args.train_size, args.seed)[:2]
    torch.manual_seed(args.seed)
    config = fip_peft.FIPConfig(
        target_modules=TARGETS,
        modules_to_save=["head"],
        anchor_budget=args.anchors,
        max_consecutive_skips=args.skip_limit,
    )
    base = SmallCNN()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    model.remember(tasks[0]["train_images"])
    adapter_dir = output_dir / "divergence_adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(adapter_dir)  # the last good adapter
    probe = tasks[1]["test_images"][:100]
    with torch.no_grad():
        good = model.eval()(probe)
    skips = SkipCounter()
    logging.getLogger("fip_peft").addHandler(skips)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=args.diverge_lr)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    stopped_at, message = None, ""
    images, labels = tasks[1]["train_images"], tasks[1]["train_labels"]
    for step in range(1, 501):
        batch = torch.randint(len(images), (args.batch_size,), generator=generator)
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        try:
            optimizer.step()
        except NonFiniteStepError as error:
            stopped_at, message = step, str(error)
            break
        optimizer.zero_grad()
    logging.getLogger("fip_peft").removeHandler(skips)
    try:
        model.save_pretrained(adapter_dir)
        save_refused = ""
    except ValueError as error:
        save_refused = str(error)[:200]
    with torch.no_grad():
        reloaded = reload(adapter_dir, base_state).eval()(probe)
    result = {
        "diverge_lr": args.diverge_lr,
        "max_consecutive_skips": args.skip_limit,
        "stopped_at_step": stopped_at,
        "skipped_steps_logged": skips.skipped,
        "consecutive_skips_at_stop": optimizer.fip_consecutive_skips,
        "stop_message": message[:300],
        "save_refused": save_refused,
        "last_good_adapter_outputs_unchanged": bool(torch.equal(reloaded, good)),
    }
    result["checks"] = {
        f"diverged run stopped after {args.skip_limit} consecutive skipped steps": stopped_at is not None
        and optimizer.fip_consecutive_skips == args.skip_limit,
        "diverged adapter refused by save_pretrained": bool(save_refused),
        "last good adapter still loads with the same outputs": result["last_good_adapter_outputs_unchanged"],
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
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        help="Parts to run: the 10 tasks with reloads, the kills during checkpoints, the diverged run.",
    )
    parser.add_argument("--checkpoint-kills", type=int, default=10, help="SIGKILLs of the checkpointing run.")
    parser.add_argument(
        "--kill-window", type=float, default=0.2, help="Kill at a random moment this long after a save begins (s)."
    )
    parser.add_argument("--kill-steps", type=int, default=40, help="Steps of the checkpointing run (one per save).")
    parser.add_argument(
        "--skip-limit", type=int, default=10, help="FIPConfig.max_consecutive_skips of the diverged run."
    )
    parser.add_argument("--diverge-lr", type=float, default=1e3, help="SGD learning rate of the diverged run.")
    parser.add_argument("--checkpoint-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.checkpoint_child is not None:
        checkpoint_child(args)
        return
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = run(args) if "tasks" in args.cases else {"args": vars(args), "checks": {}}
    if "tasks" in args.cases:
        print(
            f"ACC {result['acc']:.4f} BWT {result['bwt']:+.4f}; RSS growth after task {args.warmup_tasks}: "
            f"{result['rss_growth_mb_after_warmup']} MB; skipped steps: {result['skipped_steps']}"
        )
    for case, run_case in (("checkpoint-kills", run_checkpoint_kills), ("divergence", run_divergence)):
        if case in args.cases:
            case_start = time.perf_counter()
            result[case] = run_case(args, output_dir)
            result[case]["seconds"] = round(time.perf_counter() - case_start, 1)
            result["checks"] |= result[case]["checks"]
    result["total_s"] = round(time.perf_counter() - start, 1)
    (output_dir / "soak.json").write_text(json.dumps(result, indent=1))
    print(f"total {result['total_s']} s")
    for name, ok in result["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if not all(result["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
