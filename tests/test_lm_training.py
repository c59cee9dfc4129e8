"""Causal LMs at work (issue 27): text anchors through a tokenizer, gradient checkpointing, bf16 autocast, and
`FIPTrainer` with transformers' causal-LM collator, on tiny LMs from config."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, TrainingArguments

import fip_peft
from fip_peft import FIPConfig
from tests.test_lm_references import VOCAB, distance, fip_lm, move_adapter, tiny_lm, token_anchors

WORDS = "the cat sat on a mat and dog ran to park while bird sang in tree of old town by river".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `WORDS` (ids 2..), with pad 0 and eos 1: offline, no Hub."""
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


TEXTS = [" ".join(WORDS[i : i + 7]) for i in range(0, 20, 2)]  # 10 texts of 7 words (+ eos): 80 tokens


def test_remember_packs_raw_text_into_windows_of_max_length_tokens():
    tokenizer = word_tokenizer()
    model = fip_lm("gpt2", "top_k", reference_top_k=16)
    summary = model.remember(TEXTS, tokenizer=tokenizer, max_length=16)
    memory = model.base_model.memory()
    assert summary["total"] == 5 and memory.inputs["input_ids"].shape == (5, 16)  # 80 tokens / 16
    expected = [t for text in TEXTS for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], 1]]
    kept = memory.inputs["input_ids"][memory.inputs["attention_mask"].bool()]
    assert sorted(kept.tolist()) == sorted(expected)  # every token once (anchors are stored in random order)


def test_remember_pads_the_last_window_and_takes_a_single_string():
    model = fip_lm("llama", "full")
    model.remember("the cat sat on a mat", tokenizer=word_tokenizer(), max_length=4)  # 6 words + eos: 7 tokens
    mask = model.base_model.memory().inputs["attention_mask"]
    assert mask.shape == (2, 4) and int(mask.sum()) == 7


def test_remember_refuses_text_without_a_tokenizer_or_max_length_naming_the_argument():
    model = fip_lm("gpt2", "top_k", reference_top_k=16)
    with pytest.raises(ValueError, match=r"raw text but no `tokenizer`"):
        model.remember(TEXTS, max_length=16)
    with pytest.raises(ValueError, match=r"max_length=None.*`max_length=`"):
        model.remember(TEXTS, tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match=r"`tokenizer`.*not raw text"):
        model.remember(token_anchors(rows=4), tokenizer=word_tokenizer(), max_length=8)
    assert len(model.base_model.memory()) == 0


def test_remember_tokenizes_the_text_column_of_a_dataset():
    datasets = pytest.importorskip("datasets")
    model = fip_lm("gpt2", "top_k", reference_top_k=16)
    model.remember(datasets.Dataset.from_dict({"text": TEXTS}), tokenizer=word_tokenizer(), max_length=16)
    assert len(model.base_model.memory()) == 5


def test_text_remembered_by_a_causal_lm_is_labelled_by_its_own_next_tokens():
    model = fip_lm("gpt2", "top_k", reference_top_k=16)
    summary = model.remember("the cat sat on a mat", tokenizer=word_tokenizer(), max_length=4)  # 7 tokens, 2 windows
    memory = model.base_model.memory()
    assert summary["labelled"] == summary["total"] == 2 and memory.has_labels
    ids, mask = memory.inputs["input_ids"], memory.inputs["attention_mask"]
    assert torch.equal(memory.labels, ids.masked_fill(mask == 0, -100))  # padding carries no label


def test_explicit_labels_and_label_weight_zero_override_the_text_s_own_tokens():
    model = fip_lm("gpt2", "top_k", reference_top_k=16)
    model.remember("the cat sat on a mat", tokenizer=word_tokenizer(), max_length=4, labels=torch.full((2, 4), -100))
    assert not model.base_model.memory().has_labels
    quiet = fip_lm("gpt2", "top_k", reference_top_k=16, label_weight=0.0)
    quiet.remember("the cat sat on a mat", tokenizer=word_tokenizer(), max_length=4)
    assert quiet.base_model.memory().has_labels and quiet.peft_config["default"].label_weight == 0.0


def language_modelling_loss(model, windows: dict[str, torch.Tensor]) -> float:
    labels = windows["input_ids"].masked_fill(windows["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**windows, labels=labels).loss)


def test_the_label_term_keeps_a_causal_lm_predicting_the_remembered_text():
    """Training on other text moves the LM away from the remembered text; with the default label term (the
    remembered windows' own next tokens) its language-modelling loss there stays lower than with the outputs alone."""
    tokenizer = word_tokenizer()
    new_task = token_anchors(rows=16, length=16)
    losses = {}
    for label_weight in (0.0, None):
        model = fip_lm("gpt2", "full", rank=4, anchor_batch_size=4, beta=5.0, label_weight=label_weight)
        model.remember(TEXTS, tokenizer=tokenizer, max_length=16)
        windows = {k: v for k, v in model.base_model.memory().inputs.items()}
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=3e-2)
        torch.manual_seed(0)
        for step in range(12):
            batch = {k: v[step % 4 * 4 : step % 4 * 4 + 4] for k, v in new_task.items()}
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses[label_weight] = language_modelling_loss(model.eval(), windows)
    assert losses[None] < 0.9 * losses[0.0], losses


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fip_steps_run_with_gradient_checkpointing_and_keep_the_same_distance(kind):
    """Checkpointing recomputes activations in the backward pass; the FIP step's D and its gradient are the same."""
    results = []
    for checkpointing in (False, True):
        model = fip_lm(kind, "top_k", rank=4, reference_top_k=16, anchor_batch_size=8)
        model.remember(token_anchors(rows=8))
        move_adapter(model)
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            model.train()
            assert model.base_model.model.is_gradient_checkpointing
        model.base_model.memory().sample_step.zero_()
        value = model.base_model.anchor_distance()
        value.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None])
        results.append((float(value), grads))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


def test_fip_steps_run_under_bf16_autocast_and_d_stays_close_to_float32():
    model = fip_lm("llama", "top_k", rank=4, reference_top_k=16, anchor_batch_size=8)
    model.remember(token_anchors(rows=8))
    move_adapter(model)
    reference = distance(model)
    model.base_model.memory().sample_step.zero_()
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    batch = token_anchors(rows=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert distance(model) == pytest.approx(reference, rel=0.1)
        model.base_model.memory().sample_step.zero_()
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0 < distance(model) < float("inf")


def test_fip_trainer_trains_a_causal_lm_with_the_language_modeling_collator(tmp_path):
    datasets = pytest.importorskip("datasets")
    tokenizer = word_tokenizer()
    model = get_peft_model(
        tiny_lm("gpt2", vocab=VOCAB), FIPConfig(task_type="CAUSAL_LM", distance="kl", rank=4, reference_top_k=8)
    )
    model.remember(TEXTS, tokenizer=tokenizer, max_length=16)
    train = datasets.Dataset.from_dict({"text": TEXTS[::-1]}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=12), remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = fip_peft.FIPTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["fip_distance"] >= 0 for entry in logged)
    assert int(model.base_model.memory().sample_step) == 3
