"""TRL's `SFTTrainer` with FIP (issue 27): a tiny Llama from config remembers general text, then `SFTTrainer`
fine-tunes it on new text through a FIP optimizer (`optimizers=(create_fip_optimizer(...), None)`), or as a
`FIPTrainer` and `SFTTrainer` in one class; with its own optimizer it is refused, never silently plain fine-tuning."""

from __future__ import annotations

import datasets
import pytest
import torch
import trl
from peft import get_peft_model

from fip_peft import FIPConfig, FIPTrainer, create_fip_optimizer
from tests.test_lm_references import tiny_lm
from tests.test_lm_training import TEXTS, WORDS, word_tokenizer

STEPS = 6
LR = 3e-2
# The new task: the same words in another order (every third word from the end), so plain training moves the
# next-token distributions on the remembered text.
NEW_TEXTS = [" ".join(WORDS[::-1][i::3][:7]) for i in range(3)] * 4


def fip_llama():
    # label_weight=0: the next-token distributions alone, whose KL these tests read; the label term (the remembered
    # text's own tokens) also trains the model on that text (tests/test_lm_training.py pins it)
    config = FIPConfig(
        task_type="CAUSAL_LM", distance="kl", rank=4, reference_mode="full", anchor_batch_size=8, beta=0.05,
        label_weight=0.0,
    )  # fmt: skip
    return get_peft_model(tiny_lm("llama", peak=4.0), config)


def remembered_windows(tokenizer) -> dict[str, torch.Tensor]:
    """`TEXTS` as `remember` packs them: windows of 16 tokens (each text + eos)."""
    ids = [t for text in TEXTS for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], 1]]
    ids = torch.tensor(ids[: len(ids) // 16 * 16]).view(-1, 16)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def sft_args(tmp_path) -> trl.SFTConfig:
    return trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR, max_length=16,
        max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip


def new_task() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": NEW_TEXTS})


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def anchor_kl(model, windows, reference_log_probs) -> float:
    """Mean next-token KL(reference || model) over the remembered windows' tokens."""
    model.eval()
    with torch.no_grad():
        log_probs = model(**windows).logits.log_softmax(-1)
    return float((reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1).mean())


def train_with_sft(tmp_path, remember: bool) -> tuple[float, float, list[float], object]:
    """(anchor KL after, largest adapter change, logged task losses, optimizer) of SFTTrainer on the new task: with
    `remember`, a FIP optimizer on a model that remembered `TEXTS`; without, the same AdamW on the same model with
    nothing remembered (plain SFT)."""
    tokenizer = word_tokenizer()
    model = fip_llama()
    windows = remembered_windows(tokenizer)
    with torch.no_grad():
        reference = model(**windows).logits.log_softmax(-1)
    if remember:
        model.remember(TEXTS, tokenizer=tokenizer, max_length=16)
        optimizer = create_fip_optimizer(model, torch.optim.AdamW, lr=LR)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    before = adapter_state(model)
    trainer = trl.SFTTrainer(
        model=model, args=sft_args(tmp_path), train_dataset=new_task(), processing_class=tokenizer,
        optimizers=(optimizer, None),
    )  # fmt: skip
    trainer.train()
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n in before)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return anchor_kl(model, windows, reference), moved, losses, optimizer


def test_sft_trainer_with_a_fip_optimizer_moves_the_adapter_and_keeps_the_anchor_kl_well_below_plain_sft(tmp_path):
    """Same model, data, AdamW, learning rate and steps; only the FIP step differs. FIP learns the new text about as
    fast (task loss 5.90 -> 4.70 against 4.65 for plain SFT) while its anchors' KL stays near a ninth of plain
    SFT's (0.021 against 0.18 when written)."""
    fip_kl, fip_moved, fip_losses, optimizer = train_with_sft(tmp_path / "fip", remember=True)
    plain_kl, plain_moved, plain_losses, _ = train_with_sft(tmp_path / "plain", remember=False)
    assert optimizer.fip_steps == STEPS
    assert fip_moved > 0.05 and plain_moved > 0.05
    assert fip_losses[-1] < fip_losses[0] - 0.8 and fip_losses[-1] < plain_losses[-1] + 0.2
    assert plain_kl > 0.1
    assert fip_kl < 0.25 * plain_kl


def test_sft_trainer_with_its_default_optimizer_on_a_model_with_remembered_anchors_is_refused(tmp_path):
    tokenizer = word_tokenizer()
    model = fip_llama()
    model.remember(TEXTS, tokenizer=tokenizer, max_length=16)
    before = adapter_state(model)
    trainer = trl.SFTTrainer(
        model=model, args=sft_args(tmp_path), train_dataset=new_task(), processing_class=tokenizer
    )
    with pytest.raises(RuntimeError, match=r"silently fall back to plain fine-tuning.*FIPTrainer"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert int(model.base_model.memory().sample_step) == 0


class FIPSFTTrainer(FIPTrainer, trl.SFTTrainer):
    """`SFTTrainer`'s data handling with `FIPTrainer`'s FIP step and `fip_distance` logs."""


def test_a_trainer_that_is_both_fip_trainer_and_sft_trainer_takes_fip_steps_and_logs_the_distance(tmp_path):
    tokenizer = word_tokenizer()
    model = fip_llama()
    model.remember(TEXTS, tokenizer=tokenizer, max_length=16)
    trainer = FIPSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=new_task(), processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == STEPS and all(entry["fip_distance"] >= 0 for entry in logged)
    assert int(model.base_model.memory().sample_step) == STEPS
