"""Forgetting when a causal LM learns a new task (issue 27): SmolLM2-135M-Instruct on fortunes topics.

Every method trains the same model from the same start for the same number of optimizer steps on the same batches
(examples/continual_lm.py: topic classification of Debian `fortunes`, loss on the label tokens), then is scored on
the new task (accuracy by label-token log-probability) and on what it should keep: held-out perplexity on the
Python docs' tutorial/FAQ and half the Jargon File, and zero-shot abilities scored by log-probability.

- ``full``: full fine-tuning of every weight (AdamW, ``--full_learning_rate``).
- ``lora8``, ``lora16``: peft LoRA (alpha 2r) on q/k/v/o/gate/up/down of every layer (``--learning_rate``).
- ``lora16_kl``: LoRA r16 + ``--kl_weight`` x KL(base || model) on a batch of general-text windows per step (the
  base model's next-token distribution recomputed with the adapter disabled).
- ``replay16``: LoRA r16 + ``--replay_weight`` x language-modelling loss on a batch of general-text windows per step.
- ``fip8``, ``fip16``: FIP (distance "kl", top-k references, the package's default beta unless ``--beta``), rank r on
  the same modules, remembering the same general-text windows (``--learning_rate``).
- ``fip16_outputs``: ``fip16`` with ``label_weight=0``: the next-token distributions alone, without the label term
  (the remembered windows' own next tokens, which FIP uses by default for text remembered by a causal LM).
- ``fip16_recompute``: ``fip16`` with ``reference_mode="recompute"`` (exact full-vocabulary KL to the base model).
- ``fip_full``: FIP with a full-rank displacement (``--full_learning_rate``); slow on CPU.

KL, replay and FIP use the same windows (``--anchors`` of 128 tokens from the Python library reference / how-tos
and the other half of the Jargon File, disjoint from the held-out text) and ``--anchor_batch_size`` per step.
Reported per method: new-task accuracy, perplexity change on each held-out text, zero-shot score, seconds per
step, peak RSS increment of the training phase (CPU) or peak CUDA memory. Writes ``results.json``, ``results.md``
and ``pareto.png`` to ``--output_dir``.

    python benchmarks/lm_forgetting.py --quick                      # smoke run (2 steps, tiny eval)
    python benchmarks/lm_forgetting.py --split validation --methods full,lora16   # pick steps / lr on validation
    python benchmarks/lm_forgetting.py --max_steps 30 --seeds 0     # the reduced comparison on the test split
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT)]

from continual_lm import Method, evaluate, general_windows, heldout_sets, train  # noqa: E402
from data_lm import fortune_task  # noqa: E402

ALL_METHODS = (
    "full",
    "lora8",
    "lora16",
    "lora16_kl",
    "replay16",
    "fip8",
    "fip16",
    "fip16_outputs",
    "fip16_recompute",
    "fip_full",
)
DEFAULT_METHODS = ("full", "lora8", "lora16", "lora16_kl", "replay16", "fip16")


def make_method(name: str, args: argparse.Namespace) -> Method:
    lr, full_lr = args.learning_rate, args.full_learning_rate
    table = {
        "full": Method("full", "full", learning_rate=full_lr),
        "lora8": Method("lora8", "lora", rank=8, learning_rate=lr),
        "lora16": Method("lora16", "lora", rank=16, learning_rate=lr),
        "lora16_kl": Method("lora16_kl", "lora_kl", rank=16, learning_rate=lr, kl_weight=args.kl_weight),
        "replay16": Method("replay16", "replay", rank=16, learning_rate=lr, replay_weight=args.replay_weight),
        "fip8": Method("fip8", "fip", rank=8, learning_rate=lr, beta=args.beta),
        "fip16": Method("fip16", "fip", rank=16, learning_rate=lr, beta=args.beta),
        "fip16_outputs": Method(
            "fip16_outputs", "fip", rank=16, learning_rate=lr, beta=args.beta, extra={"label_weight": 0.0}
        ),
        "fip16_recompute": Method(
            "fip16_recompute", "fip", rank=16, learning_rate=lr, beta=args.beta, extra={"reference_mode": "recompute"}
        ),
        "fip_full": Method("fip_full", "fip", rank=None, learning_rate=full_lr, beta=args.beta),
    }
    return table[name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {ALL_METHODS}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (task split, batches, anchors)")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="low-rank adapters (LoRA, FIP r)")
    parser.add_argument("--full_learning_rate", type=float, default=1e-4, help="full fine-tuning, full-rank FIP")
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--kl_weight", type=float, default=1.0)
    parser.add_argument("--replay_weight", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=None, help="FIPConfig.beta (None: the package default)")
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--anchor_batch_size", type=int, default=2)
    parser.add_argument("--heldout", type=int, default=8, help="held-out windows of 128 tokens per general text")
    parser.add_argument("--train_per_topic", type=int, default=30)
    parser.add_argument("--eval_per_topic", type=int, default=15)
    parser.add_argument("--split", choices=("validation", "test"), default="test")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--output_dir", default="outputs/lm_forgetting")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: 2 steps, 4 anchors, tiny evaluation")
    parser.add_argument(
        "--figure_from", nargs="+", default=None, metavar="RESULTS_JSON",
        help="train nothing: draw --output_dir/sweep.png from these results.json files (validation runs: the beta / "
        "KL-weight curves; test runs: mean and min-max over seeds per method)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps, args.anchors, args.heldout, args.anchor_batch_size = 2, 4, 2, 2
        args.train_per_topic, args.eval_per_topic, args.per_device_train_batch_size = 2, 2, 2
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def to_device(tensors: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in tensors.items()}


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def run(args: argparse.Namespace) -> list[dict]:
    from smollm2 import load_smollm2

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    _, tokenizer = load_smollm2(args.cache_dir)
    for seed in args.seeds:
        task = fortune_task(
            train_per_topic=args.train_per_topic, validation_per_topic=args.eval_per_topic,
            test_per_topic=args.eval_per_topic, seed=seed,
        )  # fmt: skip
        heldout = {
            k: to_device(v, args.device) for k, v in heldout_sets(tokenizer, args.heldout, 128, args.split).items()
        }
        anchors = to_device(general_windows(tokenizer, "anchor", args.anchors, 128), args.device)
        base, _ = load_smollm2(args.cache_dir)
        start = time.perf_counter()
        before = evaluate(base.to(args.device), tokenizer, task, heldout, args.split)
        print(
            f"seed {seed} before ({time.perf_counter() - start:.0f} s eval):", json.dumps(_round(before)), flush=True
        )
        rows.append({"seed": seed, "method": "base", **before})
        del base
        for name in args.methods:
            method = make_method(name, args)
            gc.collect()
            torch.manual_seed(seed)
            model, _ = load_smollm2(args.cache_dir)
            model = model.to(args.device)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            trained, seconds, rss, extra = train(
                method, model, tokenizer, task, anchors, args.max_steps, args.per_device_train_batch_size,
                args.anchor_batch_size, seed, args.gradient_checkpointing,
            )  # fmt: skip
            peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else rss
            result = evaluate(trained, tokenizer, task, heldout, args.split)
            row = {"seed": seed, "method": name, **result, "seconds_per_step": seconds, "peak_mib": peak / 2**20}
            row["mean_extra"] = extra
            for key in before:
                if key.startswith("ppl_"):
                    row[f"d{key}"] = result[key] - before[key]
            rows.append(row)
            print(f"seed {seed} {name}:", json.dumps(_round(row)), flush=True)
            (out / "results.json").write_text(
                json.dumps({"args": vars(args), "commit": commit(), "rows": rows}, indent=1)
            )
            del trained, model
    report(rows, out, args)
    return rows


def _round(row: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def report(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    names = ["base", *args.methods]
    lines = [
        "| method | new-task acc | ppl python docs (change) | ppl jargon (change) | zero-shot acc / p(right) "
        "| s/step | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    mean = {}
    for name in names:
        group = [r for r in rows if r["method"] == name]
        if not group:
            continue
        m = {k: sum(r[k] for r in group) / len(group) for k in group[0] if isinstance(group[0][k], float)}
        mean[name] = m
        if name == "base":
            lines.append(
                f"| base (before) | {m['task_accuracy']:.3f} | {m['ppl_python_docs']:.2f} | {m['ppl_jargon']:.2f} | "
                f"{m['zero_shot_accuracy']:.3f} / {m['zero_shot_p_correct']:.3f} | | |"
            )
            continue
        lines.append(
            f"| {name} | {m['task_accuracy']:.3f} | {m['ppl_python_docs']:.2f} ({m['dppl_python_docs']:+.2f}) | "
            f"{m['ppl_jargon']:.2f} ({m['dppl_jargon']:+.2f}) | {m['zero_shot_accuracy']:.3f} / "
            f"{m['zero_shot_p_correct']:.3f} | {m['seconds_per_step']:.2f} | {m['peak_mib']:.0f} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)
    for fip in [n for n in mean if n.startswith("fip")]:
        for lora in ("lora16", "lora8"):
            if lora in mean:
                f, o = mean[fip], mean[lora]
                acc_ok = f["task_accuracy"] >= o["task_accuracy"] - 0.02
                rise_ok = f["dppl_python_docs"] <= max(o["dppl_python_docs"], 0) / 3
                print(
                    f"target {fip} vs {lora}: accuracy within 2 points: {acc_ok} "
                    f"({100 * (f['task_accuracy'] - o['task_accuracy']):+.1f}); python-docs ppl rise <= 1/3 of "
                    f"{lora}'s: {rise_ok} ({f['dppl_python_docs']:+.2f} vs {o['dppl_python_docs']:+.2f})"
                )
                break
    _pareto(mean, out / "pareto.png")


def _pareto(mean: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = mean.get("base")
    if base is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for index, (name, m) in enumerate(item for item in mean.items() if item[0] != "base"):
        rise, acc = m["dppl_python_docs"], 100 * m["task_accuracy"]
        ax.scatter([rise], [acc], marker="*" if name.startswith("fip") else "o", s=80)
        ax.annotate(name, (rise, acc), textcoords="offset points", xytext=(4, 4 if index % 2 else -12))
    ax.set_xscale("symlog", linthresh=2.0)
    ax.axhline(100 * base["task_accuracy"], color="grey", lw=0.5, ls="--", label="before training")
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("held-out perplexity change, python docs (symlog; left is better)")
    ax.set_ylabel("new-task accuracy, % (up is better)")
    ax.set_title("SmolLM2-135M on fortunes topics: learning vs forgetting")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _setting(row: dict, args: dict) -> float | None:
    if row["method"].startswith("fip"):
        return args["beta"]
    return args["kl_weight"] if row["method"].endswith("_kl") else None


def _color(name: str) -> str:
    return f"C{ALL_METHODS.index(name)}" if name in ALL_METHODS else "black"


def sweep_figure(paths: list[str], path: Path) -> None:
    """Left: the validation runs in `paths` (new-task accuracy against python-docs perplexity change), FIP's points
    joined in order of beta and LoRA+KL's in order of KL weight. Right: the test runs, mean over seeds per method
    with min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(p).read_text()) for p in paths]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for run_ in (r for r in runs if r["args"]["split"] == "validation"):
        for row in run_["rows"]:
            if row["method"] == "base":
                continue
            value = _setting(row, run_["args"])
            curves.setdefault(row["method"], []).append(
                (value if value is not None else 0.0, row["dppl_python_docs"], 100 * row["task_accuracy"])
            )
    ax = axes[0]
    for name, points in sorted(curves.items()):
        points = sorted(set(points))
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="*" if name.startswith("fip") else "o",
                label=name, color=_color(name))  # fmt: skip
        for value, rise, acc in points:
            if name in ("fip16", "lora16_kl"):
                offset = (3, 3) if name.startswith("fip") else (3, -9)
                ax.annotate(f"{value:g}", (rise, acc), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_title("validation, seed 0 (labels: beta / KL weight)")
    ax = axes[1]
    groups: dict[str, list[dict]] = {}
    for run_ in (r for r in runs if r["args"]["split"] == "test"):
        for row in run_["rows"]:
            if row["method"] != "base":
                groups.setdefault(row["method"], []).append(row)
    for name, rows in groups.items():
        rises = [r["dppl_python_docs"] for r in rows]
        accs = [100 * r["task_accuracy"] for r in rows]
        x, y = sum(rises) / len(rises), sum(accs) / len(accs)
        ax.errorbar(
            [x], [y], xerr=[[x - min(rises)], [max(rises) - x]], yerr=[[y - min(accs)], [max(accs) - y]],
            marker="*" if name.startswith("fip") else "o", capsize=3, label=f"{name} ({len(rows)} seeds)",
            color=_color(name),
        )  # fmt: skip
    ax.set_title("test, mean and min-max over seeds")
    for ax, corner in zip(axes, ("lower right", "upper left"), strict=True):
        ax.set_xscale("symlog", linthresh=2.0)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("python-docs perplexity change (symlog; left is better)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc=corner)
    axes[0].set_ylabel("new-task accuracy, % (up is better)")
    fig.suptitle("SmolLM2-135M on fortunes topics: learning vs forgetting")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.figure_from:
        Path(arguments.output_dir).mkdir(parents=True, exist_ok=True)
        sweep_figure(arguments.figure_from, Path(arguments.output_dir) / "sweep.png")
    else:
        run(arguments)
