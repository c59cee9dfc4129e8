"""Adapters save as adapter_config.json + adapter_model.safetensors and load back exactly, anchors included."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import fip_peft
from tests._tasks import as_tokens, digits_tasks, tiny_bert

REPO = Path(__file__).resolve().parents[1]


def trained_bert(save_anchors=True, rank=None):
    torch.manual_seed(0)
    base = tiny_bert()
    config = fip_peft.FIPConfig(
        task_type="SEQ_CLS", init_weights=False, save_anchors=save_anchors, rank=rank, anchor_budget=40
    )
    model = get_peft_model(base, config)
    model.remember(as_tokens(digits_tasks()["x_a_train"][:60]))
    return model


def save_base_and_adapter(tmp_path, model):
    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")


def test_saved_files_are_only_config_and_safetensors_weights(tmp_path):
    model = trained_bert()
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    assert not any(name.startswith(("model", "pytorch_model")) for name in os.listdir(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "FIP"


def test_saved_weights_hold_displacements_and_no_base_weights(tmp_path):
    model = trained_bert()
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(".fip_delta" in k for k in keys)
    assert not any("base_layer" in k for k in keys)


def test_anchors_and_references_are_saved_when_save_anchors_is_true(tmp_path):
    trained_bert(save_anchors=True).save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert {"base_model.fip_memory.reference", "base_model.fip_memory.anchor__input_ids"} <= set(keys)


def test_anchors_are_left_out_when_save_anchors_is_false(tmp_path):
    trained_bert(save_anchors=False).save_pretrained(tmp_path)
    assert not any("fip_memory" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("rank", [None, 3])
def test_fresh_process_reproduces_logits_and_anchors(tmp_path, rank):
    model = trained_bert(rank=rank)
    save_base_and_adapter(tmp_path, model)
    probe = as_tokens(digits_tasks()["x_b_test"][:5])
    torch.save(probe, tmp_path / "probe.pt")
    model.eval()
    with torch.no_grad():
        expected = model(**probe).logits
    memory = model.base_model.memory()
    script = textwrap.dedent(
        f"""
        import torch, fip_peft
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        base = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        memory = model.base_model.memory()
        with torch.no_grad():
            torch.save({{"logits": model(**probe).logits, "reference": memory.reference,
                         "anchors": memory.inputs, "task_ids": memory.task_ids}}, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["logits"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["reference"], memory.reference, atol=0, rtol=0)
    torch.testing.assert_close(out["task_ids"], memory.task_ids, atol=0, rtol=0)
    assert out["anchors"].keys() == memory.inputs.keys()
    for key, value in memory.inputs.items():
        assert torch.equal(out["anchors"][key], value)


def test_loaded_model_continues_remembering_the_saved_tasks(tmp_path):
    model = trained_bert()
    save_base_and_adapter(tmp_path, model)
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    summary = loaded.remember(as_tokens(digits_tasks()["x_b_train"][:60]))
    assert summary["anchors_per_task"] == [20, 20]
