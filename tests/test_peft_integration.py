"""FIP behaves like any PEFT method: Auto classes, transformers' load_adapter, several adapters, parameter counts."""

import json

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

import fip_peft
from tests._tasks import MLP, as_tokens, digits_tasks, tiny_bert


@pytest.fixture
def saved(tmp_path):
    """A tiny BERT base saved to disk and a trained-looking FIP adapter on it."""
    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, fip_peft.FIPConfig(task_type="SEQ_CLS", init_weights=False, anchor_budget=8))
    model.remember(as_tokens(digits_tasks()["x_a_train"][:20]))
    model.save_pretrained(tmp_path / "adapter")
    probe = as_tokens(digits_tasks()["x_b_test"][:4])
    with torch.no_grad():
        expected = model.eval()(**probe).logits
    return tmp_path, probe, expected


def test_auto_peft_model_loads_an_fip_adapter(saved):
    path, probe, expected = saved
    model = AutoPeftModelForSequenceClassification.from_pretrained(path / "adapter").eval()
    assert isinstance(model.base_model, fip_peft.FIPModel)
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, expected, atol=1e-6, rtol=0)


def test_transformers_load_adapter_gives_the_adapted_function(saved):
    path, probe, expected = saved
    base = AutoModelForSequenceClassification.from_pretrained(path / "base")
    base.load_adapter(str(path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(**probe).logits, expected, atol=1e-6, rtol=0)


def test_print_trainable_parameters_counts_the_displacements(capsys):
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 64 * 64 + 64 * 64
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_low_rank_adapter_trains_lora_sized_parameters():
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], rank=4))
    assert model.get_nb_trainable_parameters()[0] == 2 * 4 * (64 + 64)


def test_several_adapters_can_be_added_switched_and_deleted():
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1"], init_weights=False))
    model.add_adapter("other", fip_peft.FIPConfig(target_modules=["fc1"], init_weights=False))
    x = torch.randn(3, 64)
    first = model(x)
    model.set_adapter("other")
    second = model(x)
    assert not torch.allclose(first, second)
    assert set(model.base_model.fip_memory) == {"default", "other"}
    model.set_adapter("default")
    model.delete_adapter("other")
    assert set(model.base_model.fip_memory) == {"default"}
    torch.testing.assert_close(model(x), first)


def test_each_adapter_keeps_its_own_anchors(tmp_path):
    data = digits_tasks()
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1"], anchor_budget=5))
    model.add_adapter("other", fip_peft.FIPConfig(target_modules=["fc1"], anchor_budget=7))
    model.remember(data["x_a_train"])
    model.set_adapter("other")
    model.remember(data["x_b_train"], adapter_name="other")
    model.set_adapter("default")
    assert len(model.base_model.memory("default")) == 5
    assert len(model.base_model.memory("other")) == 7
    model.save_pretrained(tmp_path)
    assert len(PeftModel.from_pretrained(MLP(), tmp_path).base_model.memory()) == 5
    assert len(PeftModel.from_pretrained(MLP(), tmp_path / "other").base_model.memory()) == 7


def test_target_modules_that_match_nothing_raise_and_leave_the_model_untouched():
    model = MLP()
    with pytest.raises(ValueError, match="target_modules|Target modules"):
        get_peft_model(model, fip_peft.FIPConfig(target_modules=["does_not_exist"]))
    assert not any(isinstance(m, fip_peft.FIPLayer) for m in model.modules())


def test_custom_model_without_target_modules_is_told_to_name_them():
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(MLP(), fip_peft.FIPConfig())


def test_push_to_hub_uploads_the_adapter_files(monkeypatch):
    """Intercepted at the huggingface_hub API boundary: no network, the exact files that would be sent."""
    from huggingface_hub import HfApi, RepoUrl

    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            source = operation.path_or_fileobj
            uploaded[operation.path_in_repo] = open(source, "rb").read() if isinstance(source, str) else source
        return None

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1"], anchor_budget=4))
    model.remember(digits_tasks()["x_a_train"])
    model.push_to_hub("someone/fip-mlp", token="not-a-real-token")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(uploaded)
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "FIP"


def test_a_layer_already_adapted_by_another_method_is_refused():
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(target_modules=["fc1"]), MLP())
    with pytest.raises(TypeError, match="already adapted"):
        get_peft_model(model, fip_peft.FIPConfig(target_modules=["fc1"]))
