"""Run under `torchrun --nproc_per_node 2 -m tests._anchor_count_worker OUT` (tests/test_reliability_round2.py): every
rank remembers its own shard of the anchors, as a per-rank data split would, and writes what each FIP entry point
raised to OUT/rank<r>.json."""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from peft import get_peft_model
from torch import nn
from transformers import TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import fip_peft
from tests._tasks import MLP, digits_tasks


class LossMLP(MLP):
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = super().forward(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def outcome(run) -> dict[str, str]:
    try:
        run()
    except Exception as error:  # noqa: BLE001 - what was raised is the result
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": "", "message": ""}


def main(out: str) -> None:
    data = digits_tasks()
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
        save_strategy="no", report_to=[], disable_tqdm=True,
    )  # fmt: skip
    rank = args.process_index
    x, y = data["x_b_train"][:32], data["y_b_train"][:32]
    dataset = Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")
    results = {}

    def model_with(rows: torch.Tensor):
        torch.manual_seed(0)
        model = get_peft_model(LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=64))
        model.remember(rows)
        return model

    # different counts: rank 0 remembers 16 anchors, rank 1 8 (an uneven split)
    shard = data["x_a_train"][:16] if rank == 0 else data["x_a_train"][16:24]

    def trainer_run():
        fip_peft.FIPTrainer(model=model_with(shard), args=args, train_dataset=dataset).train()

    results["trainer"] = outcome(trainer_run)

    # same counts, different anchors, in a hand-written loop (no DDP wrapper to broadcast them)
    same_size = data["x_a_train"][16 * rank : 16 * (rank + 1)]

    def loop_run():
        model = model_with(same_size)
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
        nn.functional.cross_entropy(model(x[:8]).logits, y[:8]).backward()
        optimizer.step()

    results["loop"] = outcome(loop_run)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1])
