"""Sparsification of the packaged MiniLM on Rotten Tomatoes sentiment: FIP against magnitude pruning, side by side.

One dense model is fine-tuned first; every method then starts from that same dense model and gets the same number of
optimizer steps (``--steps``) at each target sparsity:

- ``one-shot``: global magnitude pruning of the target weights, no training.
- ``one-shot-saliency`` (not in the default set): the same with ``FIPConfig(sparsity_criterion="saliency")``: the
  entries with the smallest saliency under the FIP metric go, gathered on ``metric_anchors`` (128) of the 512
  training-input anchors; no training.
- ``one-shot-obs`` (not in the default set): the same with ``FIPConfig(sparsity_criterion="obs",
  sparsity_scope="layer")``: every layer pruned to s by optimal brain surgeon under the input factor A gathered on
  ``metric_anchors`` (128) anchors, the kept entries of each row compensating (SparseGPT's solve); no training.
- ``IMP``: iterative magnitude pruning with fine-tuning: ``--imp-rounds`` rounds, each pruning to
  ``1 - (1 - s)^(r / R)`` and fine-tuning on the task loss with the mask held.
- ``authors``: the authors' recipe (see ``/work/shared/FIP.md``): each step zeroes the globally smallest s of *all*
  parameters (embeddings, norms and head included) to get w_sparse, takes the direction
  grad D_Bhattacharyya(outputs, dense outputs) + lambda (w - w_sparse) on a batch of the task's training inputs,
  normalises it to unit length and steps by epsilon; constant target, hard zero of the smallest s of all parameters at
  the end. (During the walk the threshold of w_sparse is the quantile of 2^20 magnitudes sampled at random, not of
  all 22.7M, to keep the step affordable on CPU; the final hard zero is exact.)
- ``one-shot-magnitude`` (not in the default set): magnitude pruning through the adapter, so that
  ``--fip-option sparsity_scope=2:4`` gives the 2:4 pattern; no training.
- ``FIP``: this package's defaults: ``FIPConfig(objective="sparsify", target_sparsity=s,
  sparsity_ramp_steps=steps // 2)``, whose unset ``sparsity_criterion``/``sparsity_scope``/``sparsity_schedule``
  resolve to the measured recipe for s (``fip_peft.math.sparsity.recommended_recipe``; ``--fip-option`` overrides
  them),
  ``remember`` of the training inputs, task loss + FIP step (AdamW at ``--fip-lr``), then ``merge_and_unload()``.
  ``--fip-option sparsity_scope=2:4 --sparsities 0.5`` walks to the 2:4 pattern.
- ``FIP+unlabeled`` (not in the default set): ``FIP`` whose anchors are the training inputs plus
  ``--unlabeled-anchors`` more reviews of the training split without their labels (the end of its seeded shuffle,
  disjoint from the training subset and the validation rows), ``anchor_budget`` set to hold them all. A different
  data regime: the other methods cannot use unlabeled text.
- ``dense-continued`` (not in the default set): the dense model fine-tuned ``--steps`` more steps, nothing pruned
  (run once, shown at every sparsity): the control for a pruned model that ends above the dense one, since every
  trained method gets ``--steps`` of the task loss on top of the dense model's.
- ``FIP-anchors`` (not in the default set): the same without the task loss (``optimizer.zero_grad();
  optimizer.step()``: the anchor term and the pull only).

Target weights are the 36 linear layers of the encoder (query/key/value/output/intermediate/output of 6 layers);
the pooler, embeddings, norms and classifier head are not pruned (except by the authors' recipe, which prunes
everything; its table also shows the sparsity of the target weights it reached). Accuracy is on a held-out test
subset; wall time per method covers its training and pruning (not evaluation).

    python benchmarks/sparsify.py                     # the documented run
    python benchmarks/sparsify.py --sparsities 0.8 --steps 20 --eval-size 100   # a quick look

Runs on the GPU when there is one (``--device``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import itertools
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import datasets
import torch
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DataCollatorWithPadding, get_scheduler, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from continual_text import MeanPoolingClassifier, default_model_path  # noqa: E402
from data import sentiment_task  # noqa: E402
from fip_options import parse_fip_options  # noqa: E402
from sparsify_text import tokenize_split  # noqa: E402

import fip_peft  # noqa: E402
from fip_peft.math.sparsity import magnitude_masks, recommended_recipe  # noqa: E402

TARGET_REGEX = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
AUTHORS_THRESHOLD_SAMPLE = 2**20


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The encoder's linear layers (the pruned weights of every method but the authors')."""
    import re

    pattern = re.compile(TARGET_REGEX)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(name)}


def target_sparsity_of(model: nn.Module) -> float:
    weights = [m.weight for m in target_linears(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def layer_sparsity_range(model: nn.Module) -> list[float]:
    """The smallest and largest fraction of zeros among the target layers (1.0: a layer emptied)."""
    fractions = [float((m.weight == 0).float().mean()) for m in target_linears(model).values()]
    return [min(fractions), max(fractions)]


def two_four_fraction(model: nn.Module) -> float:
    """The fraction of groups of 4 consecutive inputs (of a row of a target weight) with at least 2 zeros: 1.0 when
    every target weight keeps the 2:4 pattern."""
    groups = [(m.weight == 0).reshape(m.weight.shape[0], -1, 4).sum(-1) >= 2 for m in target_linears(model).values()]
    return sum(int(g.sum()) for g in groups) / sum(g.numel() for g in groups)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in INPUT_NAMES}


def to_device(batch: dict, device: str | torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def batches(loader: DataLoader, device: str = "cpu"):
    """An endless stream of training batches (reshuffled every pass) on `device`."""
    while True:
        for batch in loader:
            yield to_device(batch, device)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for batch in loader:
        batch = to_device(batch, device)
        logits = model(**model_inputs(batch)).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    model.train(was_training)
    return correct / total


def lr_scheduler(optimizer: torch.optim.Optimizer, steps: int, schedule: str, warmup_ratio: float):
    """`transformers.get_scheduler` over `steps` optimizer steps (what `Trainer` builds from the same arguments);
    `"warmup_stable_decay"` decays (cosine) over the second half, FIP's steps after its sparsity ramp."""
    warmup = int(round(warmup_ratio * steps))
    specific = {"num_decay_steps": steps - steps // 2} if schedule == "warmup_stable_decay" else None
    return get_scheduler(
        schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps, scheduler_specific_kwargs=specific
    )


def train_plain(
    model: nn.Module,
    stream,
    steps: int,
    lr: float,
    masks: dict | None,
    desc: str,
    schedule: str = "constant",
    warmup_ratio: float = 0.0,
) -> None:
    """AdamW on the task loss under the learning-rate `schedule`; with `masks` (module name -> keep mask) pruned
    weights are held at zero."""
    modules = target_linears(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = lr_scheduler(optimizer, steps, schedule, warmup_ratio)
    model.train()
    for batch in tqdm(itertools.islice(stream, steps), total=steps, desc=desc, leave=False):
        optimizer.zero_grad()
        model(**model_inputs(batch), labels=batch["labels"]).loss.backward()
        optimizer.step()
        scheduler.step()
        if masks:
            with torch.no_grad():
                for name, keep in masks.items():
                    modules[name].weight.mul_(keep)


def prune_targets(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning of the target weights in place; returns the keep masks."""
    modules = target_linears(model)
    masks = magnitude_masks({name: m.weight for name, m in modules.items()}, sparsity, "global")
    with torch.no_grad():
        for name, keep in masks.items():
            modules[name].weight.mul_(keep)
    return masks


def run_dense_continued(dense: nn.Module, sparsity: float, *, stream, args) -> nn.Module:
    """The dense model fine-tuned `--steps` more steps (AdamW at `--lr`, as dense fine-tuning), nothing pruned: the
    control for a pruned model that ends above the dense one after its own `--steps` of training."""
    model = copy.deepcopy(dense)
    train_plain(model, stream, args.steps, args.lr, None, "dense, continued")
    return model


def run_one_shot(dense: nn.Module, sparsity: float, **_) -> nn.Module:
    model = copy.deepcopy(dense)
    prune_targets(model, sparsity)
    return model


def _one_shot_by(criterion: str, dense: nn.Module, sparsity: float, args, train_data) -> nn.Module:
    """One-shot pruning by `FIPConfig.sparsity_criterion` (a metric criterion, on the anchors), no training."""
    config = {"target_modules": TARGET_REGEX, "objective": "sparsify", "target_sparsity": sparsity}
    scope = {"sparsity_scope": "layer"} if criterion == "obs" and "sparsity_scope" not in args.fip_options else {}
    model = get_peft_model(
        copy.deepcopy(dense),
        fip_peft.FIPConfig(**config, **{**args.fip_options, "sparsity_criterion": criterion, **scope}),
    )
    model.remember(train_data)
    model.apply_sparsity_mask()
    return model.merge_and_unload()


def run_one_shot_magnitude(dense: nn.Module, sparsity: float, *, args, train_data, **_) -> nn.Module:
    """One-shot magnitude pruning through the adapter (its `sparsity_scope`, e.g. the 2:4 pattern), no training."""
    return _one_shot_by("magnitude", dense, sparsity, args, train_data)


def run_one_shot_saliency(dense: nn.Module, sparsity: float, *, args, train_data, **_) -> nn.Module:
    """One-shot pruning by saliency under the FIP metric on the anchors."""
    return _one_shot_by("saliency", dense, sparsity, args, train_data)


def run_one_shot_obs(dense: nn.Module, sparsity: float, *, args, train_data, **_) -> nn.Module:
    """One-shot pruning by optimal brain surgeon under the metric's input factor, every layer at the target."""
    return _one_shot_by("obs", dense, sparsity, args, train_data)


def run_imp(dense: nn.Module, sparsity: float, *, stream, args) -> nn.Module:
    model = copy.deepcopy(dense)
    rounds = args.imp_rounds
    for r in range(1, rounds + 1):
        masks = prune_targets(model, 1 - (1 - sparsity) ** (r / rounds))
        steps = args.steps // rounds + (1 if r <= args.steps % rounds else 0)
        train_plain(
            model,
            stream,
            steps,
            args.imp_lr,
            masks,
            f"IMP {sparsity:.0%} round {r}/{rounds}",
            args.lr_schedule,
            args.warmup_ratio,
        )
    return model


def _bhattacharyya(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """-log sum_k sqrt(p_k q_k), summed over the batch (as the authors' code)."""
    p, q = logits.softmax(-1), reference.softmax(-1)
    return -torch.log((p * q).clamp_min(0).sqrt().sum(-1).clamp_min(1e-12)).sum()


def _prune_all(params: list[torch.Tensor], sparsity: float, sample: int | None = None) -> list[torch.Tensor]:
    """Keep masks zeroing the globally smallest `sparsity` of all parameters; with `sample`, the threshold is the
    quantile of that many magnitudes drawn at random (the per-step w_sparse of the walk, for speed)."""
    magnitudes = torch.cat([p.detach().abs().flatten() for p in params])
    if sample is not None and sample < magnitudes.numel():
        magnitudes = magnitudes[torch.randint(magnitudes.numel(), (sample,))]
    threshold = magnitudes.kthvalue(max(1, int(round(sparsity * magnitudes.numel())))).values
    return [p.detach().abs() > threshold for p in params]


def run_authors(dense: nn.Module, sparsity: float, *, stream, args) -> nn.Module:
    model = copy.deepcopy(dense)
    params = list(model.parameters())
    dense.eval()
    model.eval()  # the authors' distance is measured without dropout noise here, as the package does
    for batch in tqdm(
        itertools.islice(stream, args.steps), total=args.steps, desc=f"authors {sparsity:.0%}", leave=False
    ):
        inputs = model_inputs(batch)
        with torch.no_grad():
            reference = dense(**inputs).logits
        model.zero_grad()
        _bhattacharyya(model(**inputs).logits, reference).backward()
        with torch.no_grad():
            keeps = _prune_all(params, sparsity, sample=AUTHORS_THRESHOLD_SAMPLE)
            directions = [
                (p.grad if p.grad is not None else torch.zeros_like(p)) + args.authors_lambda * p * ~keep
                for p, keep in zip(params, keeps, strict=True)
            ]
            norm = torch.sqrt(sum((d**2).sum() for d in directions)).clamp_min(1e-12)
            for p, d in zip(params, directions, strict=True):
                p.sub_(args.authors_epsilon * d / norm)
    with torch.no_grad():
        for p, keep in zip(params, _prune_all(params, sparsity), strict=True):
            p.mul_(keep)
    return model


def run_fip(
    dense: nn.Module, sparsity: float, *, stream, args, train_data, task_loss: bool = True, anchor_budget=None
) -> nn.Module:
    budget = {} if anchor_budget is None else {"anchor_budget": anchor_budget}
    model = get_peft_model(
        copy.deepcopy(dense),
        fip_peft.FIPConfig(
            **{
                "target_modules": TARGET_REGEX,
                "objective": "sparsify",
                "target_sparsity": sparsity,
                "sparsity_ramp_steps": args.steps // 2,
                **budget,
                **args.fip_options,
            }
        ),
    )
    model.remember(train_data)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=fip_lr(args, sparsity), weight_decay=0.01)
    scheduler = lr_scheduler(optimizer, args.steps, args.lr_schedule, args.warmup_ratio)
    model.train()
    for batch in tqdm(itertools.islice(stream, args.steps), total=args.steps, desc=f"FIP {sparsity:.0%}", leave=False):
        optimizer.zero_grad()
        if task_loss:
            model(**model_inputs(batch), labels=batch["labels"]).loss.backward()
        optimizer.step()
        scheduler.step()
    report = model.sparsity_report()
    merged = model.merge_and_unload()
    counted = target_sparsity_of(merged)
    if abs(counted - report["sparsity"]) > 1e-9:
        raise AssertionError(f"sparsity_report says {report['sparsity']} but the merged model has {counted}.")
    return merged


def fip_lr(args: argparse.Namespace, sparsity: float) -> float:
    """`--fip-lr`, or when it is not given the learning rate measured with the recipe FIP's config resolves to at
    `sparsity` (`fip_peft.math.sparsity.recommended_recipe`, with the walk's ramp and the `--fip-option` overrides)."""
    if args.fip_lr is not None:
        return args.fip_lr
    options = args.fip_options
    fields = ("sparsity_criterion", "sparsity_scope", "sparsity_schedule")
    ramp = options.get("sparsity_ramp_steps", args.steps // 2)
    return recommended_recipe(sparsity, *(options.get(name) for name in fields), ramp_steps=ramp).learning_rate


def run_fip_anchors_only(dense: nn.Module, sparsity: float, **kwargs) -> nn.Module:
    return run_fip(dense, sparsity, task_loss=False, **kwargs)


def run_fip_unlabeled(dense: nn.Module, sparsity: float, *, train_data, **kwargs) -> nn.Module:
    """FIP with every given anchor input kept (the training inputs and the unlabeled reviews)."""
    return run_fip(dense, sparsity, train_data=train_data, anchor_budget=len(train_data), **kwargs)


METHODS = {
    "dense-continued": run_dense_continued,
    "one-shot": run_one_shot,
    "one-shot-magnitude": run_one_shot_magnitude,
    "one-shot-saliency": run_one_shot_saliency,
    "one-shot-obs": run_one_shot_obs,
    "IMP": run_imp,
    "authors": run_authors,
    "FIP": run_fip,
    "FIP-anchors": run_fip_anchors_only,
    "FIP+unlabeled": run_fip_unlabeled,
}
DEFAULT_METHODS = "one-shot,IMP,authors,FIP"
# Methods whose result does not depend on the target sparsity: run once, reported at every sparsity.
SPARSITY_FREE = {"dense-continued"}
# The argument holding each trained method's learning rate (set per method by --select-lr).
LEARNING_RATE_ARGS = {"IMP": "imp_lr", "FIP": "fip_lr", "FIP-anchors": "fip_lr", "FIP+unlabeled": "fip_lr"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default=None, help="Encoder name or path (default: packaged all-MiniLM-L6-v2).")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9", help="Comma-separated target sparsities.")
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"Comma-separated methods to run, of {', '.join(METHODS)}."
    )
    parser.add_argument("--train-size", type=int, default=1000, help="Training examples (random subset).")
    parser.add_argument(
        "--unlabeled-anchors",
        type=int,
        default=4000,
        help="Unlabeled training-split reviews added to the anchors of FIP+unlabeled (from the end of the split).",
    )
    parser.add_argument("--eval-size", type=int, default=500, help="Test examples (random subset).")
    parser.add_argument("--dense-steps", type=int, default=150, help="Optimizer steps of dense fine-tuning.")
    parser.add_argument("--steps", type=int, default=96, help="Optimizer steps of every sparsifying method.")
    parser.add_argument("--imp-rounds", type=int, default=4, help="Prune/fine-tune rounds of IMP.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of dense fine-tuning.")
    parser.add_argument(
        "--imp-lr",
        type=float,
        default=1e-4,
        help="AdamW learning rate of IMP (chosen on validation, see --select-lr).",
    )
    parser.add_argument(
        "--fip-lr",
        type=float,
        default=None,
        help="AdamW learning rate of FIP (chosen on validation, see --select-lr). Default: the rate measured with the "
        "recipe FIP's config resolves to at each sparsity (fip_peft.math.sparsity.recommended_recipe; 1e-3 from 60%).",
    )
    parser.add_argument(
        "--val-size",
        type=int,
        default=300,
        help="Validation examples: training-split rows outside the --train-size subset (used by --select-lr only).",
    )
    parser.add_argument(
        "--select-lr",
        default=None,
        help="Comma-separated learning rates: run IMP and FIP (or --methods) at each on the validation split, print "
        "validation accuracy and exit without touching the test split.",
    )
    parser.add_argument(
        "--lr-schedule",
        default="constant",
        choices=["constant", "linear", "cosine", "warmup_stable_decay"],
        help="Learning-rate schedule of IMP (each round) and FIP (the whole walk), as Trainer's lr_scheduler_type; "
        "dense fine-tuning stays constant.",
    )
    parser.add_argument(
        "--warmup-ratio", type=float, default=0.0, help="Fraction of each schedule spent warming the lr up from 0."
    )
    parser.add_argument(
        "--fip-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Override a FIPConfig field of FIP (repeatable; VALUE read as JSON when it parses, else as a string: "
        "--fip-option beta=0.1 --fip-option distance=kl).",
    )
    parser.add_argument("--authors-epsilon", type=float, default=0.01, help="Authors' step length epsilon.")
    parser.add_argument("--authors-lambda", type=float, default=0.1, help="Authors' sparsity pull lambda.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default=None, help="torch device of every model (default: cuda when available, else cpu)."
    )
    parser.add_argument(
        "--dense-cache",
        default=None,
        help="File of the dense model's weights: loaded when it exists (same settings and seed assumed), else written "
        "after dense fine-tuning, so that several runs share one dense model.",
    )
    parser.add_argument("--output", default="outputs/sparsify_benchmark.json", help="Where the results go (JSON).")
    args = parser.parse_args(argv)
    args.fip_options = parse_fip_options(
        args.fip_option, fixed={"target_modules": TARGET_REGEX, "objective": "sparsify", "target_sparsity": 0.5}
    )
    return args


def unlabeled_split(data, tokenizer, args: argparse.Namespace):
    """The last `--unlabeled-anchors` rows of the training split's seeded shuffle, tokenized, without labels: after
    the training subset and the validation rows (`validation_split`), so neither is among them."""
    first = len(data) - args.unlabeled_anchors
    if first < args.train_size + args.val_size:
        raise SystemExit(
            f"--unlabeled-anchors {args.unlabeled_anchors} would overlap the training subset and validation rows "
            f"(the split has {len(data)} rows; at most {len(data) - args.train_size - args.val_size})."
        )
    rows = data.shuffle(seed=args.seed).select(range(first, len(data)))
    return rows.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=rows.column_names,
    )


def validation_split(data, tokenizer, *, skip: int, size: int, max_length: int, seed: int):
    """`size` training-split rows after the first `skip` of its seeded shuffle (those are the training subset, see
    `tokenize_split`), tokenized like it: held out from training and from the test split, for choosing settings."""
    rows = data.shuffle(seed=seed).select(range(skip, min(len(data), skip + size)))
    return rows.map(
        lambda b: {**tokenizer(b["text"], truncation=True, max_length=max_length), "labels": b["label"]},
        batched=True,
        remove_columns=rows.column_names,
    )


def select_learning_rates(run, methods: list[str], sparsities: list[float], args, val_loader) -> list[dict]:
    """Validation accuracy of each trained method at each learning rate of `--select-lr` (the test split unused)."""
    rates = [float(rate) for rate in args.select_lr.split(",")]
    trained = [method for method in methods if method in LEARNING_RATE_ARGS]
    rows = []
    for sparsity in sparsities:
        for rate in rates:
            for method in trained:
                setattr(args, LEARNING_RATE_ARGS[method], rate)
                pruned, seconds = run(method, sparsity)
                rows.append(
                    {"sparsity": sparsity, "method": method, "lr": rate, "val_accuracy": accuracy(pruned, val_loader)}
                )
                print(
                    f"{sparsity:.0%} {method:>8} lr {rate:g}: validation accuracy {rows[-1]['val_accuracy']:.4f}",
                    flush=True,
                )
    for sparsity in sparsities:
        print(f"\n{sparsity:.0%} sparsity, validation accuracy\n| lr | " + " | ".join(trained) + " |")
        print("| --- | " + " | ".join("---" for _ in trained) + " |")
        for rate in rates:
            found = {(r["method"], r["lr"]): r["val_accuracy"] for r in rows if r["sparsity"] == sparsity}
            cells = [f"{found[method, rate]:.3f}" for method in trained]
            print(f"| {rate:g} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}.")
    if args.select_lr is not None and not set(methods) & set(LEARNING_RATE_ARGS):
        raise SystemExit(f"--select-lr needs a trained method in --methods, of {list(LEARNING_RATE_ARGS)}.")
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is available here; use --device cpu.")
    set_seed(args.seed)
    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = sentiment_task(seed=args.seed)

    train = tokenize_split(task["train"], tokenizer, size=args.train_size, max_length=args.max_length, seed=args.seed)
    test = tokenize_split(task["test"], tokenizer, size=args.eval_size, max_length=args.max_length, seed=args.seed)
    collator = DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        train, batch_size=args.batch_size, shuffle=True, collate_fn=collator, generator=generator
    )
    anchors = train.remove_columns(["labels"])
    if "FIP+unlabeled" in methods:
        unlabeled = unlabeled_split(task["train"], tokenizer, args)
        with_unlabeled = datasets.concatenate_datasets([anchors, unlabeled])

    dense = MeanPoolingClassifier(model_path, num_labels=2).to(device)
    start = time.perf_counter()
    if args.dense_cache and Path(args.dense_cache).is_file():
        dense.load_state_dict(torch.load(args.dense_cache, map_location=device))
        print(f"dense: loaded from {args.dense_cache}", flush=True)
    else:
        train_plain(dense, batches(train_loader, device), args.dense_steps, args.lr, None, "dense fine-tuning")
        if args.dense_cache:
            torch.save(dense.state_dict(), args.dense_cache)
    dense_seconds = time.perf_counter() - start

    def run(method: str, sparsity: float) -> tuple[nn.Module, float]:
        set_seed(args.seed)
        stream = batches(
            DataLoader(
                train,
                batch_size=args.batch_size,
                shuffle=True,
                collate_fn=collator,
                generator=torch.Generator().manual_seed(args.seed + 1),
            ),
            device,
        )
        anchored = "FIP" in method or method in ("one-shot-magnitude", "one-shot-saliency", "one-shot-obs")
        extra = {"train_data": with_unlabeled if method == "FIP+unlabeled" else anchors} if anchored else {}
        start = time.perf_counter()
        pruned = METHODS[method](dense, sparsity, stream=stream, args=args, **extra)
        return pruned, time.perf_counter() - start

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "args": vars(args),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.select_lr is not None:
        val = validation_split(
            task["train"],
            tokenizer,
            skip=args.train_size,
            size=args.val_size,
            max_length=args.max_length,
            seed=args.seed,
        )
        val_loader = DataLoader(val, batch_size=64, collate_fn=collator)
        dense_val = accuracy(dense, val_loader)
        print(f"dense: validation accuracy {dense_val:.4f} ({len(val)} examples)", flush=True)
        selection = select_learning_rates(run, methods, sparsities, args, val_loader)
        output.write_text(json.dumps({**info, "dense_val_accuracy": dense_val, "selection": selection}, indent=2))
        print(f"results written to {output}")
        return

    test_loader = DataLoader(test, batch_size=64, collate_fn=collator)
    dense_accuracy = accuracy(dense, test_loader)
    print(f"dense: accuracy {dense_accuracy:.4f} after {args.dense_steps} steps ({dense_seconds:.0f} s)", flush=True)
    results = []
    for sparsity in sparsities:
        for method in methods:
            earlier = next((r for r in results if r["method"] == method), None) if method in SPARSITY_FREE else None
            if earlier is not None:
                row = {**earlier, "sparsity": sparsity}
            else:
                pruned, seconds = run(method, sparsity)
                row = {
                    "sparsity": sparsity,
                    "method": method,
                    "accuracy": accuracy(pruned, test_loader),
                    "target_weight_sparsity": target_sparsity_of(pruned),
                    "layer_sparsity_range": layer_sparsity_range(pruned),
                    "groups_2_4": two_four_fraction(pruned),
                    "seconds": seconds,
                    "steps": 0 if method.startswith("one-shot") else args.steps,
                    **({"lr": fip_lr(args, sparsity)} if LEARNING_RATE_ARGS.get(method) == "fip_lr" else {}),
                }
            results.append(row)
            low, high = row["layer_sparsity_range"]
            print(
                f"{sparsity:.0%} {method:>8}: accuracy {row['accuracy']:.4f} (dense {dense_accuracy:.4f}), "
                f"target-weight sparsity {row['target_weight_sparsity']:.4f} (layers {low:.2f}-{high:.2f}; groups "
                f"of 4 with 2 zeros {row.get('groups_2_4', float('nan')):.4f}), "
                f"{row['seconds']:.0f} s",
                flush=True,
            )

    print("\n| sparsity | " + " | ".join(methods) + " |")
    print("| --- | " + " | ".join("---" for _ in methods) + " |")
    for sparsity in sparsities:
        cells = []
        for method in methods:
            row = next(r for r in results if r["sparsity"] == sparsity and r["method"] == method)
            cells.append(f"{row['accuracy']:.3f} ({row['seconds']:.0f} s)")
        print(f"| {sparsity:.0%} | " + " | ".join(cells) + " |")
    output.write_text(
        json.dumps(
            {**info, "dense": {"accuracy": dense_accuracy, "seconds": dense_seconds}, "results": results}, indent=2
        )
    )
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
