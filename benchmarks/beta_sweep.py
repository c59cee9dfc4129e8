"""How `beta` trades preservation of task A against learning task B, over seeds: the evidence for its default.

The setting of tests/test_function_preservation.py (digits 0-4 then 5-9, one shared 10-way head trained in full,
200 AdamW steps; full rank at lr 2e-3, rank 4 at 10x): for each seed the base model learns task A, then task B is
trained once without anchors (plain fine-tuning of the same adapter) and once per `beta` after `remember`.
Reported per beta: change ratio = FIP's mean squared logit change on task-A test inputs / plain's (target <= 0.2)
and accuracy gap = plain's task-B test accuracy - FIP's (target <= 0.05).

    python benchmarks/beta_sweep.py --model mlp --rank 0 --betas 0.3,0.4,0.5 --seeds 0,1,2
    python benchmarks/beta_sweep.py --model tiny-bert --rank 4 --betas 0.7 --seeds 0,1,2
    python benchmarks/beta_sweep.py --model mlp --rank 0 --betas 0.4 --fip-option anchor_interval=4

`--fip-option FIELD=VALUE` sets a FIPConfig field of the FIP runs (not of the plain baseline, which has no anchors).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from fip_options import parse_fip_options  # noqa: E402
from peft import get_peft_model  # noqa: E402

import fip_peft  # noqa: E402
from tests._tasks import MLP, accuracy, as_tokens, clone, digits_tasks, logits_of, run_steps, tiny_bert, train_plain  # noqa: E402

STEPS = 200
FULL_RANK_LR = 2e-3


def base_model(kind: str, seed: int, digits: dict):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], steps=300, lr=1e-2)
        return model, {"target_modules": ["fc1", "fc2"], "modules_to_save": ["head"]}, lambda x: x
    model = train_plain(tiny_bert(), as_tokens(digits["x_a_train"]), digits["y_a_train"], steps=300, lr=3e-3)
    return model, {"task_type": "SEQ_CLS"}, as_tokens


def train_task_b(setting: tuple, beta: float | None) -> tuple[float, float]:
    """Train task B; `beta=None` is plain fine-tuning (no anchors). Returns (task-A logit change, task-B accuracy)."""
    base, config, encode, rank, lr, seed, digits, before, options = setting
    torch.manual_seed(seed)
    extra = options if beta is not None else {}
    model = get_peft_model(clone(base), fip_peft.FIPConfig(rank=rank, beta=beta or 1.0, **config, **extra))
    if beta is not None:
        model.remember(encode(digits["x_a_train"]))
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=lr)
    run_steps(model, optimizer, encode(digits["x_b_train"]), digits["y_b_train"], STEPS, seed=seed)
    with torch.no_grad():
        change = float((logits_of(model.eval(), encode(digits["x_a_test"])) - before).pow(2).mean())
    return change, accuracy(model, encode(digits["x_b_test"]), digits["y_b_test"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "tiny-bert"], default="mlp")
    parser.add_argument("--rank", type=int, default=0, help="0 for a full-rank displacement.")
    parser.add_argument("--betas", default="0.4", help="Comma-separated beta values.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument(
        "--fip-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Set a FIPConfig field of the FIP runs (repeatable; VALUE read as JSON when it parses).",
    )
    args = parser.parse_args()
    options = parse_fip_options(args.fip_option)
    rank = args.rank or None
    lr = FULL_RANK_LR if rank is None else 10 * FULL_RANK_LR
    betas = [float(b) for b in args.betas.split(",")]
    digits = digits_tasks()
    rows: dict[float, list[tuple[float, float]]] = {beta: [] for beta in betas}
    for seed in (int(s) for s in args.seeds.split(",")):
        base, config, encode = base_model(args.model, seed, digits)
        with torch.no_grad():
            before = logits_of(base.eval(), encode(digits["x_a_test"]))

        setting = (base, config, encode, rank, lr, seed, digits, before, options)
        plain_change, plain_acc = train_task_b(setting, None)
        for beta in betas:
            change, acc = train_task_b(setting, beta)
            rows[beta].append((change / plain_change, plain_acc - acc))
    print(f"model={args.model} rank={rank} lr={lr} seeds={args.seeds} options={options}")
    print(f"{'beta':>6}  {'change ratios':<26}{'accuracy gaps':<30}{'worst ratio':>12}{'worst gap':>11}")
    for beta, results in rows.items():
        ratios = ", ".join(f"{r:.3f}" for r, _ in results)
        gaps = ", ".join(f"{g:+.3f}" for _, g in results)
        worst_ratio, worst_gap = max(r for r, _ in results), max(g for _, g in results)
        print(f"{beta:>6}  {ratios:<26}{gaps:<30}{worst_ratio:>12.3f}{worst_gap:>+11.3f}")


if __name__ == "__main__":
    main()
