"""Acceptance: with default settings FIP keeps task A's outputs while learning task B about as well as plain tuning.

Task A = digits 0-4, task B = digits 5-9, one shared 10-way head (class-incremental). The base model first learns
task A; then the same adapter (hidden layers adapted, the head trained in full as `modules_to_save`, as for a
classifier) trains 200 steps on task B, once after `remember(task A inputs)` (FIP) and once
without (plain fine-tuning of the same parameters with the same optimizer, seed and steps). Low-rank adapters use a
10x learning rate, as LoRA users do.
"""

import pytest
import torch
from peft import get_peft_model

import fip_peft
from tests._tasks import MLP, accuracy, as_tokens, clone, logits_of, run_steps, tiny_bert, train_plain

STEPS = 200
FULL_RANK_LR = 2e-3
LOW_RANK_LR = 10 * FULL_RANK_LR
MAX_CHANGE_RATIO = 0.2
MAX_ACCURACY_GAP = 0.05


def base_and_config(kind: str, digits):
    torch.manual_seed(0)
    if kind == "mlp":
        model = train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], steps=300, lr=1e-2)
        return model, {"target_modules": ["fc1", "fc2"], "modules_to_save": ["head"]}, lambda x: x
    model = train_plain(tiny_bert(), as_tokens(digits["x_a_train"]), digits["y_a_train"], steps=300, lr=3e-3)
    return model, {"task_type": "SEQ_CLS"}, as_tokens


def train_task_b(base, config: dict, encode, digits, rank, remember: bool):
    torch.manual_seed(0)
    model = get_peft_model(clone(base), fip_peft.FIPConfig(rank=rank, **config))
    if remember:
        model.remember(encode(digits["x_a_train"]))
    lr = FULL_RANK_LR if rank is None else LOW_RANK_LR
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=lr)
    run_steps(model, optimizer, encode(digits["x_b_train"]), digits["y_b_train"], STEPS)
    return model.eval()


@pytest.mark.parametrize("rank", [None, 4], ids=["full-rank", "rank-4"])
@pytest.mark.parametrize("kind", ["mlp", "tiny-bert"])
def test_default_fip_keeps_old_outputs_and_learns_the_new_task(kind, rank, digits):
    base, config, encode = base_and_config(kind, digits)
    anchors_a = encode(digits["x_a_train"])
    with torch.no_grad():
        before = logits_of(base.eval(), anchors_a)

    results = {}
    for name, remember in (("plain", False), ("fip", True)):
        model = train_task_b(base, config, encode, digits, rank, remember)
        with torch.no_grad():
            change = float((logits_of(model, anchors_a) - before).pow(2).mean())
        results[name] = (change, accuracy(model, encode(digits["x_b_test"]), digits["y_b_test"]))

    (plain_change, plain_acc), (fip_change, fip_acc) = results["plain"], results["fip"]
    assert fip_change <= MAX_CHANGE_RATIO * plain_change, results
    assert fip_acc >= plain_acc - MAX_ACCURACY_GAP, results
