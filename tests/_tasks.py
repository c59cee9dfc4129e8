"""Small real data and tiny models shared by the tests: scikit-learn's 8x8 digits split into two tasks."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel, get_peft_model
from sklearn.datasets import load_digits
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import fip_peft

NUM_CLASSES = 10
PIXEL_LEVELS = 4
SPECIAL_TOKENS = 2


def digits_tasks() -> dict[str, torch.Tensor]:
    """Task A = digits 0-4, task B = digits 5-9 (class-incremental, one shared 10-way head); train/test split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    out = {}
    for part, rows in (("train", slice(0, split)), ("test", slice(split, None))):
        for task, keep in (("a", y[rows] < 5), ("b", y[rows] >= 5)):
            out[f"x_{task}_{part}"] = x[rows][keep]
            out[f"y_{task}_{part}"] = y[rows][keep]
    return out


def as_tokens(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Digits as token sequences for a tiny BERT: [CLS] + one token per pixel, naming its position and level."""
    levels = (pixels.long() * PIXEL_LEVELS) // 17
    ids = torch.arange(pixels.shape[1]) * PIXEL_LEVELS + levels + SPECIAL_TOKENS
    cls = torch.ones(ids.shape[0], 1, dtype=torch.long)
    input_ids = torch.cat([cls, ids], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class MLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x / 16.0)))))


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=64 * PIXEL_LEVELS + SPECIAL_TOKENS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        num_labels=NUM_CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def logits_of(model: nn.Module, inputs) -> torch.Tensor:
    out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def train_plain(model: nn.Module, inputs, labels: torch.Tensor, steps: int, lr: float, batch: int = 32) -> nn.Module:
    """Plain supervised training (the way the base model learns task A)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    run_steps(model, optimizer, inputs, labels, steps, batch)
    return model


def run_steps(model, optimizer, inputs, labels, steps: int, batch: int = 32, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (batch,), generator=generator)
        rows = inputs[index] if isinstance(inputs, torch.Tensor) else {k: v[index] for k, v in inputs.items()}
        loss = nn.functional.cross_entropy(logits_of(model, rows), labels[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def accuracy(model: nn.Module, inputs, labels: torch.Tensor) -> float:
    model.eval()
    return float((logits_of(model, inputs).argmax(-1) == labels).float().mean())


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def mlp_model(**config) -> PeftModel:
    """The MLP with an FIP adapter on its two hidden layers (the head is not adapted)."""
    return get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], **config))


def bert_model(**config) -> PeftModel:
    """The tiny BERT with an FIP adapter on all its linear layers (the classifier is trained in full)."""
    return get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", **config))


def sparsify_bert(tokens: dict[str, torch.Tensor], device: str = "cpu", **config) -> PeftModel:
    """A tiny BERT (on `device`) whose query/value/dense layers sparsify to 50% over 4 steps (mask updated every
    step, unless `config` says otherwise), with `tokens` remembered."""
    torch.manual_seed(0)
    settings = {
        "target_modules": ["query", "value", "dense"],
        "exclude_modules": ["pooler.dense"],
        "objective": "sparsify",
        "target_sparsity": 0.5,
        "sparsity_ramp_steps": 4,
        "sparsity_update_every": 1,
        "anchor_batch_size": 8,
    }
    model = get_peft_model(tiny_bert().to(device), fip_peft.FIPConfig(**(settings | config)))
    model.remember(tokens)
    return model


def sparsify_trainer(model: PeftModel, data, output_dir, **settings) -> fip_peft.FIPTrainer:
    """FIPTrainer for 4 steps of batch 8 at lr 1e-3, no checkpoints unless `settings` (TrainingArguments) say so."""
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        **({"save_strategy": "no"} | settings),
    )
    return fip_peft.FIPTrainer(model=model, args=args, train_dataset=data)


def resumed_and_uninterrupted(tokens: dict[str, torch.Tensor], output_dir, **config) -> tuple[PeftModel, PeftModel]:
    """Two `sparsify_bert` walks of 4 `FIPTrainer` steps on `tokens`, the first resumed from the second's step-2
    checkpoint."""
    from datasets import Dataset

    data = Dataset.from_dict({k: v.tolist() for k, v in tokens.items()})
    uninterrupted = sparsify_bert(tokens, **config)
    sparsify_trainer(uninterrupted, data, output_dir, save_strategy="steps", save_steps=2).train()
    resumed = sparsify_bert(tokens, **config)
    sparsify_trainer(resumed, data, output_dir / "resumed").train(
        resume_from_checkpoint=str(output_dir / "checkpoint-2")
    )
    return resumed, uninterrupted


def assert_same_walk(model: PeftModel, expected: PeftModel) -> None:
    """Same parameters (atol 1e-6) and identical sparsity masks."""
    for (name, weight), (_, want) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(weight, want, atol=1e-6, rtol=0, msg=name)
    for (name, mask), (_, want) in zip(model.named_buffers(), expected.named_buffers(), strict=True):
        if "fip_mask" in name:
            assert torch.equal(mask, want), name
