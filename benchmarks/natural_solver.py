"""Penalty vs natural vs natural+penalty FIP solvers vs plain fine-tuning on class-incremental task sequences.

Two sequences of 5 tasks of 2 classes each with one shared 10-way head trained in full (`modules_to_save`):

- `digits`: scikit-learn's 8x8 digits, the MLP of tests/_tasks.py (full-rank FIP on fc1, fc2), 150 AdamW steps per
  task at lr 3e-3, batch 32, 100 anchors (as benchmarks/split_digits.py).
- `fashion`: split Fashion-MNIST, the CNN of examples/continual_vision.py (conv 16, conv 32, fc 128; FIP on conv1,
  conv2, fc1), 200 AdamW steps per task at lr 1e-3, batch 64, 2,000 training images per task, 200 anchors.

Every method runs at its defaults (natural solvers: damping 0.1, metric_update_interval 10, 128 metric anchors).
Each (method, seed) runs in its own process (one thread) so that its peak memory (max RSS) is its own; the methods
of a seed run one after the other, so they share the machine's load. Reported per method: ACC and BWT (mean and
spread over seeds), seconds per training step and its ratio to plain fine-tuning, peak RSS, and ACC at equal wall
time (each task gets the wall time the penalty solver took for it in the same seed; every method trains until it
is spent).

    python benchmarks/natural_solver.py --sequence digits --seeds 0,1,2
    python benchmarks/natural_solver.py --sequence fashion --seeds 0,1,2
    python benchmarks/natural_solver.py --ablation --seeds 0,1,2   # how the natural direction is used; defaults
    python benchmarks/natural_solver.py --sequence fashion --step-cost   # interleaved step timing
    python benchmarks/natural_solver.py --staleness --seeds 0,1,2   # why natural alone forgets: a stale metric
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

METHODS = {
    "plain fine-tuning": None,
    "FIP penalty": {"solver": "penalty"},
    "FIP natural": {"solver": "natural"},
    "FIP natural+penalty": {"solver": "natural+penalty"},
    "FIP natural+penalty, eigendecomposition every refresh": {"solver": "natural+penalty", "metric_basis_interval": 1},
    "FIP natural+penalty, refresh in one pass": {"solver": "natural+penalty", "metric_batch_size": 256},
    "FIP natural+penalty, refresh in one pass every 50 steps": {
        "solver": "natural+penalty",
        "metric_batch_size": 256,
        "metric_update_interval": 50,
    },
}
SEQUENCES = {
    "digits": {"steps": 150, "lr": 3e-3, "batch": 32, "anchors": 100},
    "fashion": {"steps": 200, "lr": 1e-3, "batch": 64, "anchors": 200, "train_size": 2000},
}


def _cnn():
    from torch import nn

    class SmallCNN(nn.Module):
        """The CNN of examples/continual_vision.py."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(32 * 7 * 7, 128)
            self.head = nn.Linear(128, 10)

        def forward(self, x):
            x = self.pool(torch.relu(self.conv1(x)))
            x = self.pool(torch.relu(self.conv2(x)))
            return self.head(torch.relu(self.fc1(x.flatten(1))))

    import torch

    return SmallCNN()


def load_tasks(sequence: str, seed: int) -> tuple[list, list]:
    """Five (train x, train y) and five (test x, test y) pairs of two classes each."""
    import torch

    if sequence == "digits":
        from benchmarks.split_digits import split_digits

        x_train, y_train, x_test, y_test = split_digits()
    else:
        from data import load_fashion_mnist

        x_train, y_train = load_fashion_mnist("train")
        x_test, y_test = load_fashion_mnist("test")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for task in range(5):
        rows = torch.nonzero((y_train // 2) == task).flatten()
        size = SEQUENCES[sequence].get("train_size")
        if size is not None:
            rows = rows[torch.randperm(len(rows), generator=generator)[:size]]
        train.append((x_train[rows], y_train[rows]))
        test_rows = (y_test // 2) == task
        test.append((x_test[test_rows], y_test[test_rows]))
    return train, test


def run(sequence: str, method: str, seed: int, budgets: list[float] | None, variants: dict | None = None) -> dict:
    """One continual run of `method` (a key of `variants`, default `METHODS`); with `budgets`, task t trains for
    budgets[t] seconds instead of a fixed step count."""
    import torch
    from peft import get_peft_model

    import fip_peft
    from fip_peft.apps.evaluation import average_accuracy, backward_transfer
    from tests._tasks import MLP

    torch.set_num_threads(1)
    settings = SEQUENCES[sequence]
    train, test = load_tasks(sequence, seed)
    torch.manual_seed(seed)
    if sequence == "digits":
        model, targets = MLP(), ["fc1", "fc2"]
    else:
        model, targets = _cnn(), ["conv1", "conv2", "fc1"]
    options = (METHODS if variants is None else variants)[method] or {}
    config = fip_peft.FIPConfig(
        target_modules=targets, modules_to_save=["head"], anchor_budget=settings["anchors"], **options
    )
    model = get_peft_model(model, config)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=settings["lr"])
    generator = torch.Generator().manual_seed(seed)
    matrix, seconds, steps = [], [], []
    for index, (x, y) in enumerate(train):
        model.train()
        start, done = time.perf_counter(), 0
        while (done < settings["steps"]) if budgets is None else (time.perf_counter() - start < budgets[index]):
            batch = torch.randint(len(y), (settings["batch"],), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
        seconds.append(time.perf_counter() - start)
        steps.append(done)
        model.eval()
        with torch.no_grad():
            matrix.append([float((model(tx).argmax(-1) == ty).float().mean()) for tx, ty in test])
        if options:
            model.remember(x)
    return {
        "acc": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "seconds_per_task": seconds,
        "steps_per_task": steps,
        "seconds_per_step": sum(seconds) / sum(steps),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


ABLATION = {
    "plain fine-tuning": None,
    "penalty (beta 0.4)": {"solver": "penalty"},
    "natural, P grad into AdamW, damping 0.01": {"solver": "natural", "damping": 0.01},
    "natural, P grad into AdamW, damping 0.1 (default)": {"solver": "natural"},
    "natural, P grad into AdamW, damping 1": {"solver": "natural", "damping": 1.0},
    "natural, AdamW update projected (P u), damping 0.1": "project-update",
    "natural, fixed length epsilon 1e-3": {"solver": "natural", "epsilon": 1e-3},
    "natural, fixed length epsilon 1e-2": {"solver": "natural", "epsilon": 1e-2},
    "natural+penalty, beta 0.4": {"solver": "natural+penalty", "beta": 0.4},
    "natural+penalty, beta 2": {"solver": "natural+penalty", "beta": 2.0},
    "natural+penalty, beta 5 (default)": {"solver": "natural+penalty"},
    "natural+penalty, beta 5, damping 1": {"solver": "natural+penalty", "damping": 1.0},
}


# Why `natural` alone forgets over a sequence: how fresh its metric is (every refresh reads all 100 anchors of the
# digits sequence in one pass, so only the refresh interval, the damping and the output directions change).
STALENESS = {
    "FIP penalty": {"solver": "penalty"},
    "natural, damping 0.1, refresh every 10 steps (defaults)": {"solver": "natural"},
    "natural, damping 0.01, every 10 steps": {"solver": "natural", "damping": 0.01},
    "natural, damping 0.01, every 10 steps, 32 output directions per anchor": {
        "solver": "natural",
        "damping": 0.01,
        "metric_samples": 32,
    },
    "natural, damping 0.01, every 5 steps": {"solver": "natural", "damping": 0.01, "metric_update_interval": 5},
    "natural, damping 0.01, every 2 steps": {"solver": "natural", "damping": 0.01, "metric_update_interval": 2},
    "natural, damping 0.01, every step": {"solver": "natural", "damping": 0.01, "metric_update_interval": 1},
    "natural, damping 0.001, every step": {"solver": "natural", "damping": 0.001, "metric_update_interval": 1},
    "natural+penalty, every 10 steps (defaults)": {"solver": "natural+penalty"},
    "natural+penalty, every step": {"solver": "natural+penalty", "metric_update_interval": 1},
}


def staleness(seeds: list[int]) -> None:
    """ACC and seconds per step of `natural` on split digits as its metric is refreshed more often."""
    variants = {
        name: options if options["solver"] == "penalty" else {**options, "metric_batch_size": 256}
        for name, options in STALENESS.items()
    }
    rows = {name: [run("digits", name, seed, None, variants) for seed in seeds] for name in variants}
    print(f"\nsplit digits, seeds {seeds}, 150 steps per task")
    print("| variant | ACC | BWT | ms / step |")
    print("| --- | --- | --- | --- |")
    for name, results in rows.items():
        step = statistics.mean(r["seconds_per_step"] for r in results) * 1000
        accs, bwts = [r["acc"] for r in results], [r["bwt"] for r in results]
        print(f"| {name} | {_mean_sd(accs)} | {_mean_sd(bwts)} | {step:.1f} |")


def ablation_run(variant: dict | str | None, seed: int, digits: dict, base) -> tuple[float, float, float]:
    """Digits 0-4 then 5-9 (the core acceptance setting of benchmarks/beta_sweep.py): learn B in 200 AdamW steps at
    lr 2e-3 after remembering A. Returns (task-A accuracy, task-B accuracy, mean squared task-A logit change)."""
    import torch
    from peft import get_peft_model

    import fip_peft
    from fip_peft.optimizers.preconditioner import MetricPreconditioner
    from tests._tasks import accuracy, clone, logits_of, run_steps

    torch.manual_seed(seed)
    options = {"solver": "natural"} if variant == "project-update" else (variant or {})
    config = fip_peft.FIPConfig(target_modules=["fc1", "fc2"], modules_to_save=["head"], **options)
    model = get_peft_model(clone(base), config)
    if variant is not None:
        model.remember(digits["x_a_train"])
    with torch.no_grad():
        before = logits_of(model.eval(), digits["x_a_test"])
    if variant == "project-update":
        _train_projecting_updates(model, digits, seed, MetricPreconditioner(model.base_model, "default"))
    else:
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=2e-3)
        run_steps(model, optimizer, digits["x_b_train"], digits["y_b_train"], 200, seed=seed)
    with torch.no_grad():
        change = float((logits_of(model.eval(), digits["x_a_test"]) - before).pow(2).mean())
    return (
        accuracy(model, digits["x_a_test"], digits["y_a_test"]),
        accuracy(model, digits["x_b_test"], digits["y_b_test"]),
        change,
    )


def _train_projecting_updates(model, digits: dict, seed: int, preconditioner) -> None:
    """The alternative to preconditioning the gradient: AdamW steps on grad L, then each covered layer's update u
    becomes P u (metric refreshed every 10 steps)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    model.base_model._register_fip_optimizer(optimizer)  # the FIP step is done here, by hand
    generator = torch.Generator().manual_seed(seed)
    x, y = digits["x_b_train"], digits["y_b_train"]
    for step in range(200):
        if step % 10 == 0:
            preconditioner.refresh()
        model.train()
        index = torch.randint(0, len(y), (32,), generator=generator)
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        layers = {name: layer for name, layer in preconditioner.layers.items() if name in preconditioner.metric}
        before = {name: [p.detach().clone() for p in layer.params] for name, layer in layers.items()}
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for name, layer in layers.items():
                update = layer.as_matrix(*[p - b for p, b in zip(layer.params, before[name], strict=True)])
                for p, b, new in zip(
                    layer.params,
                    before[name],
                    layer.from_matrix(preconditioner.metric[name].project(update)),
                    strict=True,
                ):
                    p.copy_(b + new)


def ablation(seeds: list[int]) -> None:
    """How the natural direction is best used, and the defaults of `damping` and `beta` for the natural solvers."""
    import torch

    from tests._tasks import MLP, digits_tasks, train_plain

    torch.set_num_threads(1)
    digits = digits_tasks()
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ABLATION}
    for seed in seeds:
        torch.manual_seed(seed)
        base = train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], steps=300, lr=1e-2)
        for name, variant in ABLATION.items():
            results[name].append(ablation_run(variant, seed, digits, base))
            print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    plain = [change for _, _, change in results["plain fine-tuning"]]
    print(f"\ndigits A -> B, seeds {seeds}")
    print("| variant | task-A accuracy | task-B accuracy | change ratio (A logits, / plain) |")
    print("| --- | --- | --- | --- |")
    for name, rows in results.items():
        ratios = [change / p for (_, _, change), p in zip(rows, plain, strict=True)]
        print(f"| {name} | {_mean_sd([r[0] for r in rows])} | {_mean_sd([r[1] for r in rows])} | {_mean_sd(ratios)} |")


def step_cost(sequence: str, rounds: int, block: int, methods: list[str]) -> None:
    """Seconds per training step of each method on the same model and data, measured in interleaved blocks of
    `block` steps (round-robin over the methods, `rounds` times; the median block), so that the machine's load
    drifts over all methods alike. With metric_update_interval=10 and block=10 every natural block holds exactly
    one metric refresh. Also the size of the natural solver's metric (its eigenvectors and eigenvalues)."""
    import torch
    from peft import get_peft_model

    import fip_peft
    from tests._tasks import MLP

    torch.set_num_threads(1)
    settings = SEQUENCES[sequence]
    train, _ = load_tasks(sequence, 0)
    (x_a, _), (x_b, y_b) = train[0], train[1]
    runs = {}
    for name in methods:
        options = METHODS[name]
        torch.manual_seed(0)
        model = MLP() if sequence == "digits" else _cnn()
        targets = ["fc1", "fc2"] if sequence == "digits" else ["conv1", "conv2", "fc1"]
        config = fip_peft.FIPConfig(
            target_modules=targets, modules_to_save=["head"], anchor_budget=settings["anchors"], **(options or {})
        )
        model = get_peft_model(model, config)
        if options:
            model.remember(x_a)
        runs[name] = (model, fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=settings["lr"]))
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds + 1):
        for name, (model, optimizer) in runs.items():
            model.train()
            start = time.perf_counter()
            for _ in range(block):
                batch = torch.randint(len(y_b), (settings["batch"],), generator=generator)
                torch.nn.functional.cross_entropy(model(x_b[batch]), y_b[batch]).backward()
                optimizer.step()
                optimizer.zero_grad()
            times[name].append((time.perf_counter() - start) / block)
    plain = statistics.median(times["plain fine-tuning"][1:])
    print(f"\n{sequence}: median of {rounds} interleaved blocks of {block} steps (first round dropped)")
    print("| method | ms / step | x plain | metric state MiB |")
    print("| --- | --- | --- | --- |")
    for name, (_model, optimizer) in runs.items():
        median = statistics.median(times[name][1:])
        preconditioner = getattr(optimizer, "_fip_preconditioner", None)
        size = 0
        if preconditioner is not None and preconditioner.metric:
            for metric in preconditioner.metric.values():
                for eigen in (metric.a, metric.g):
                    for t in (eigen.values, eigen.vectors, eigen.index):
                        size += t.numel() * t.element_size() if t is not None else 0
        print(f"| {name} | {median * 1000:.1f} | {median / plain:.2f} | {size / 2**20:.2f} |")


def _in_child(args: tuple) -> dict:
    return run(*args)


def _mean_sd(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def select_methods(names: list[str] | None) -> list[str]:
    """The methods to run, in `METHODS` order: those named plus the two every table needs."""
    if names is None:
        return list(METHODS)
    wanted = set(names)
    unknown = sorted(wanted - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}.")
    wanted |= {"plain fine-tuning", "FIP penalty"}
    return [name for name in METHODS if name in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence", choices=sorted(SEQUENCES), default="digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default=None, help="Write all results as JSON here.")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="Method names, each one argument (default: all); plain fine-tuning and FIP penalty always run, they "
        "set the x plain column and the equal-time budgets.",
    )
    parser.add_argument(
        "--ablation", action="store_true", help="Instead: how to use the natural direction, on digits A -> B."
    )
    parser.add_argument(
        "--step-cost", action="store_true", help="Instead: interleaved timing of one step of each method."
    )
    parser.add_argument(
        "--staleness",
        action="store_true",
        help="Instead: natural on split digits with the metric refreshed every 10, 5, 2, 1 steps.",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = select_methods(args.methods)
    if args.ablation:
        ablation(seeds)
        return
    if args.staleness:
        staleness(seeds)
        return
    if args.step_cost:
        step_cost(args.sequence, rounds=15, block=10, methods=methods)
        return
    context = multiprocessing.get_context("spawn")
    results: dict[str, list[dict]] = {name: [] for name in methods}
    timed: dict[str, list[dict]] = {name: [] for name in methods}
    for seed in seeds:
        for name in methods:
            with context.Pool(1) as pool:
                results[name].append(pool.apply(_in_child, ((args.sequence, name, seed, None),)))
            print(f"seed {seed} {name}: {json.dumps(results[name][-1])}", flush=True)
        budgets = results["FIP penalty"][-1]["seconds_per_task"]
        for name in methods:
            with context.Pool(1) as pool:
                timed[name].append(pool.apply(_in_child, ((args.sequence, name, seed, budgets),)))
            print(f"seed {seed} {name} (equal time): {json.dumps(timed[name][-1])}", flush=True)
    plain = statistics.mean(r["seconds_per_step"] for r in results["plain fine-tuning"])
    print(f"\nsequence {args.sequence}, seeds {seeds}")
    print("| method | ACC | BWT | s / step | x plain | peak RSS MiB | ACC at equal wall time | steps per task then |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in methods:
        rows, equal = results[name], timed[name]
        step = statistics.mean(r["seconds_per_step"] for r in rows)
        steps = statistics.mean(statistics.mean(r["steps_per_task"]) for r in equal)
        print(
            f"| {name} | {_mean_sd([r['acc'] for r in rows])} | {_mean_sd([r['bwt'] for r in rows])} | "
            f"{step * 1000:.1f} ms | {step / plain:.2f} | {statistics.mean(r['peak_rss_mib'] for r in rows):.0f} | "
            f"{_mean_sd([r['acc'] for r in equal])} | {steps:.0f} |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps({"fixed_steps": results, "equal_time": timed}, indent=1))


if __name__ == "__main__":
    main()
