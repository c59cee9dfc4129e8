"""Causal LMs (issue 27): compact references (top-k, recomputed), the next-token KL on them, text anchors."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fip_peft
from fip_peft import FIPConfig
from fip_peft.math.distances import functional_distance, gathered_log_probs, top_k_reference
from fip_peft.method.memory import reference_bytes

VOCAB = 300
# The temperature that makes the tiny LMs' next-token distributions peaked like a trained LM's: their top 64 classes
# then hold >= 90% of the mass (tests below check it).
PEAK = 20.0


def tiny_lm(kind: str, vocab: int = VOCAB, peak: float = PEAK, hidden: int = 32):
    """A tiny causal LM from config; its final norm scaled by `peak` sharpens its next-token distributions."""
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_layer=2, n_embd=hidden, n_head=2, vocab_size=vocab, n_positions=160, bos_token_id=0, eos_token_id=1
            )
        )
        model.transformer.ln_f.weight.data *= peak
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_attention_heads=2,
                num_key_value_heads=2,
                vocab_size=vocab,
                max_position_embeddings=160,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        model.model.norm.weight.data *= peak
    return model.eval()


def token_anchors(rows: int = 24, length: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, length * 2 // 3 :] = 0  # every third anchor right-padded
    return {"input_ids": ids, "attention_mask": mask}


def fip_lm(kind: str, mode: str, **config) -> PeftModel:
    config = {"task_type": "CAUSAL_LM", "distance": "kl", "anchor_batch_size": 24, **config}
    return get_peft_model(tiny_lm(kind), FIPConfig(reference_mode=mode, **config))


def move_adapter(model: PeftModel, seed: int = 1, std: float = 0.02) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "fip_" in name:
                param.normal_(0.0, std)


def distance(model: PeftModel) -> float:
    """D on all anchors (one batch of `anchor_batch_size` >= the anchors)."""
    return float(model.base_model.anchor_distance().detach())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_top_k_kl_is_a_lower_bound_within_ten_percent_of_the_full_kl_on_a_peaked_lm(kind):
    """The k + 1 class KL coarse-grains the full one (never above it); where the reference's top 64 classes hold
    >= 90% of the mass it stays within 10% of it."""
    anchors = token_anchors()
    with torch.no_grad():
        probs = tiny_lm(kind)(**anchors).logits.softmax(-1)
    assert float(probs.topk(64, dim=-1).values.sum(-1).mean()) >= 0.9
    values = {}
    for mode in ("full", "top_k"):
        model = fip_lm(kind, mode, reference_top_k=64)
        model.remember(anchors)
        assert model.base_model.memory().reference_mode == mode
        move_adapter(model)
        values[mode] = distance(model)
    assert 0.0 < values["top_k"] <= values["full"] * (1 + 1e-5)
    assert values["top_k"] >= 0.9 * values["full"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_recomputed_references_give_exactly_the_full_distance_and_store_nothing(kind):
    anchors = token_anchors()
    values = {}
    for mode in ("full", "recompute"):
        model = fip_lm(kind, mode)
        model.remember(anchors)
        move_adapter(model)
        values[mode] = distance(model)
        if mode == "recompute":
            assert model.base_model.memory().reference.numel() == 0
    assert values["recompute"] == pytest.approx(values["full"], rel=1e-5, abs=1e-7)


def test_recompute_with_the_logit_distance_keeps_the_full_scale():
    anchors = token_anchors()
    scales = {}
    for mode in ("full", "recompute"):
        model = fip_lm("gpt2", mode, distance="logits")
        model.remember(anchors)
        scales[mode] = float(model.base_model.memory().scale)
    assert scales["recompute"] == pytest.approx(scales["full"], rel=1e-5)


def test_recompute_is_refused_once_the_adapter_moved_and_nothing_is_remembered():
    model = fip_lm("gpt2", "recompute")
    model.remember(token_anchors())
    move_adapter(model)
    before = model.base_model.memory().anchors_per_task()
    with pytest.raises(ValueError, match=r"reference_mode='recompute'.*'top_k'.*nothing was remembered"):
        model.remember(token_anchors(rows=8))
    assert model.base_model.memory().anchors_per_task() == before


def test_top_k_distance_leaves_padding_out():
    """Changing the outputs at padded positions does not change D; changing a real token's does."""
    torch.manual_seed(0)
    outputs = torch.randn(2, 5, 40) * 4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    reference = top_k_reference(outputs + 0.3 * torch.randn_like(outputs), 8)
    base = functional_distance(outputs, reference, "kl", mask)
    padded = outputs.clone()
    padded[0, 3:] = torch.randn(2, 40) * 10
    assert functional_distance(padded, reference, "kl", mask) == pytest.approx(float(base), rel=1e-6)
    moved = outputs.clone()
    moved[0, 1] = torch.randn(40) * 10
    assert float(functional_distance(moved, reference, "kl", mask)) > float(base)


def test_top_k_reference_and_gathered_probabilities_sum_to_one_and_match_on_the_same_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 3
    reference = top_k_reference(logits, 10)
    assert reference.logprobs.shape == (3, 7, 11) and reference.index.dtype == torch.int32
    assert torch.allclose(reference.logprobs.exp().sum(-1), torch.ones(3, 7), atol=1e-5)
    assert torch.allclose(gathered_log_probs(logits, reference.index), reference.logprobs, atol=1e-5)
    assert float(functional_distance(logits, reference, "kl")) == pytest.approx(0.0, abs=1e-6)
    assert float(functional_distance(logits, reference, "bhattacharyya")) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["top_k", "recompute"])
def test_compact_references_reload_with_the_adapter(tmp_path, mode):
    model = fip_lm("llama", mode, reference_top_k=16)
    model.remember(token_anchors())
    move_adapter(model)
    expected = distance(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_lm("llama"), tmp_path)
    memory = loaded.base_model.memory()
    assert memory.reference_mode == mode and len(memory) == 24
    loaded.base_model.memory().sample_step.zero_()
    assert distance(loaded) == pytest.approx(expected, rel=1e-5)


def test_auto_keeps_top_k_for_a_vocabulary_under_kl_and_full_for_the_logit_distance():
    model = fip_lm("gpt2", "auto", reference_top_k=16)
    model.remember(token_anchors(rows=4))
    assert model.base_model.memory().reference_mode == "top_k"
    model = fip_lm("gpt2", "auto", distance="logits")
    model.remember(token_anchors(rows=4))
    assert model.base_model.memory().reference_mode == "full"


def test_full_references_too_big_name_reference_mode_and_change_nothing(monkeypatch):
    monkeypatch.setattr("fip_peft.method.memory.MAX_REFERENCE_BYTES", 1024)
    model = fip_lm("gpt2", "full")
    with pytest.raises(ValueError, match=r"reference_mode='full'.*reference_mode='top_k'"):
        model.remember(token_anchors(rows=4))
    assert len(model.base_model.memory()) == 0


def test_config_refuses_top_k_with_the_logit_distance_and_a_top_k_keeping_every_class():
    with pytest.raises(ValueError, match=r"reference_mode='top_k'.*distance='kl'"):
        FIPConfig(reference_mode="top_k", distance="logits")
    with pytest.raises(ValueError, match="reference_mode must be one of"):
        FIPConfig(reference_mode="sparse")
    with pytest.raises(ValueError, match=r"reference_mode='top_k'.*solver='penalty'"):
        FIPConfig(reference_mode="top_k", distance="kl", solver="projection")
    model = fip_lm("gpt2", "top_k", reference_top_k=VOCAB)
    with pytest.raises(ValueError, match=rf"reference_top_k={VOCAB} keeps every one"):
        model.remember(token_anchors(rows=4))


def test_512_anchors_of_128_tokens_on_a_50k_vocabulary_save_under_300_mib(tmp_path):
    """The storage target: measured on a saved adapter with 8 such anchors, the memory's bytes per anchor times 512,
    plus the adapter's weights, stay under 300 MiB (full references would take 13 GB)."""
    vocab, rows, length = 50257, 8, 128
    model = get_peft_model(
        tiny_lm("gpt2", vocab=vocab, hidden=8),
        FIPConfig(task_type="CAUSAL_LM", distance="kl", rank=4, target_modules=["c_attn"]),
    )
    ids = torch.randint(0, vocab, (rows, length))
    model.remember({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert model.base_model.memory().reference_mode == "top_k"  # the default ("auto") on a vocabulary under KL
    model.save_pretrained(tmp_path)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    memory_bytes = sum(t.numel() * t.element_size() for t in model.base_model.memory().state_dict().values())
    per_anchor = memory_bytes / rows
    assert per_anchor * 512 + (size - memory_bytes) < 300 * 1024**2
    assert reference_bytes(512, torch.Size([512, 128, vocab]), "top_k", 64) < 300 * 1024**2
    assert reference_bytes(512, torch.Size([512, 128, vocab]), "full", 64) > 12 * 1024**3


def test_fip_training_steps_run_on_top_k_and_recomputed_references():
    for mode in ("top_k", "recompute"):
        model = fip_lm("gpt2", mode, rank=4, reference_top_k=16, anchor_batch_size=8)
        model.remember(token_anchors(rows=8))
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-2)
        batch = token_anchors(rows=4)
        for _ in range(3):
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert 0.0 < distance(model) < float("inf")
