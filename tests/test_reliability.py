"""Reliability: bad input is refused before anything changes, NaN steps are skipped or stopped, saving is atomic and
loading a broken adapter says so."""

import json
import logging
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import fip_peft
from fip_peft.method.checks import NonFiniteStepError
from tests._tasks import MLP, as_tokens, bert_model, logits_of, mlp_model, tiny_bert


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


# ---- bad anchors ----------------------------------------------------------------------------------------------------


def test_token_ids_beyond_the_vocabulary_are_refused_before_the_model_runs(digits):
    model = bert_model(anchor_budget=8)
    tokens = as_tokens(digits["x_a_train"][:8])
    tokens["input_ids"][0, 3] = 10_000
    with pytest.raises(ValueError, match=r"input_ids.*10000.*0\.\.257"):
        model.remember(tokens)
    assert len(model.base_model.memory()) == 0


def test_negative_token_ids_are_refused(digits):
    tokens = as_tokens(digits["x_a_train"][:8])
    tokens["input_ids"][1, 1] = -1
    with pytest.raises(ValueError, match="input_ids"):
        bert_model(anchor_budget=8).remember(tokens)


def test_float_token_ids_are_a_type_error_naming_the_input(digits):
    tokens = as_tokens(digits["x_a_train"][:8])
    tokens["input_ids"] = tokens["input_ids"].float()
    with pytest.raises(TypeError, match=r"input_ids.*integer.*long\(\)"):
        bert_model(anchor_budget=8).remember(tokens)


def test_nan_anchor_inputs_are_refused(digits):
    x = digits["x_a_train"][:20].clone()
    x[4, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        mlp_model(anchor_budget=20).remember(x)


def test_anchors_of_another_dtype_than_earlier_ones_are_refused_and_change_nothing(digits):
    model = bert_model(anchor_budget=16)
    model.remember(as_tokens(digits["x_a_train"][:20]))
    before = model.base_model.memory().reference.clone()
    tokens = {k: v.int() for k, v in as_tokens(digits["x_b_train"][:20]).items()}
    with pytest.raises(TypeError, match=r"dtype torch\.int32.*torch\.int64"):
        model.remember(tokens)
    assert torch.equal(model.base_model.memory().reference, before)


def test_images_of_another_size_than_earlier_ones_are_refused_not_zero_padded():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model = get_peft_model(model, fip_peft.FIPConfig(target_modules=["0"], anchor_budget=8))
    model.remember(torch.randn(8, 1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(1, 10, 10\).*\(1, 8, 8\)"):
        model.remember(torch.randn(8, 1, 10, 10))
    assert model.base_model.memory().anchors_per_task() == [8]


# ---- remember's adapter and budget ----------------------------------------------------------------------------------


def test_remember_for_an_adapter_that_is_not_active_is_refused(digits):
    model = mlp_model(anchor_budget=8)
    model.add_adapter("other", fip_peft.FIPConfig(target_modules=["fc1"], anchor_budget=8))
    with pytest.raises(ValueError, match=r"adapter_name='other'.*set_adapter\('other'\)"):
        model.remember(digits["x_a_train"], adapter_name="other")
    assert len(model.base_model.memory("other")) == 0


def test_remember_for_an_unknown_adapter_is_refused(digits):
    with pytest.raises(ValueError, match="Unknown adapter 'nope'"):
        mlp_model().remember(digits["x_a_train"], adapter_name="nope")


def test_adapter_name_of_the_wrong_type_is_a_type_error(digits):
    with pytest.raises(TypeError, match="adapter_name"):
        mlp_model().remember(digits["x_a_train"], adapter_name=["default"])


def test_a_model_whose_adapter_is_not_fip_is_refused_by_the_fip_optimizer_and_trainer(tmp_path):
    model = get_peft_model(MLP(), LoraConfig(target_modules=["fc1"]))
    with pytest.raises(TypeError, match=r"no FIP adapter.*FIPConfig"):
        fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="no FIP adapter"):
        fip_peft.FIPTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_remember_with_the_adapters_disabled_is_refused(digits):
    model = mlp_model(anchor_budget=8)
    with model.disable_adapter(), pytest.raises(RuntimeError, match="disabled"):
        model.remember(digits["x_a_train"])
    assert len(model.base_model.memory()) == 0


def test_a_budget_smaller_than_the_number_of_tasks_is_refused(digits):
    model = mlp_model(anchor_budget=2)
    model.remember(digits["x_a_train"])
    model.remember(digits["x_b_train"])
    with pytest.raises(ValueError, match="anchor_budget=2 is too small for 3 tasks"):
        model.remember(digits["x_a_test"])
    assert model.base_model.memory().anchors_per_task() == [1, 1]


def test_num_anchors_that_leave_earlier_tasks_without_anchors_is_refused(digits):
    model = mlp_model(anchor_budget=4)
    model.remember(digits["x_a_train"])
    model.remember(digits["x_b_train"])
    with pytest.raises(ValueError, match=r"fewer than one each.*num_anchors <= 2"):
        model.remember(digits["x_a_test"], num_anchors=3)
    assert model.base_model.memory().anchors_per_task() == [2, 2]


def test_outputs_that_are_already_nan_are_not_remembered(digits):
    model = mlp_model(anchor_budget=8)
    with torch.no_grad():
        model.base_model.model.fc1.fip_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="outputs on 8 of 8 anchors are NaN"):
        model.remember(digits["x_a_train"])
    assert len(model.base_model.memory()) == 0


# ---- layers FIP cannot adapt ----------------------------------------------------------------------------------------


class Int8Linear(nn.Linear):
    """Stands for a bitsandbytes-style layer: an `nn.Linear` subclass whose weight is stored as int8."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)


def test_a_torch_quantized_layer_is_refused_before_any_layer_is_replaced():
    model = MLP()
    model.fc2 = torch.ao.nn.quantized.dynamic.Linear(64, 64)
    with pytest.raises(TypeError, match=r"'fc2'.*qint8.*quantized.*target_modules"):
        get_peft_model(model, fip_peft.FIPConfig(target_modules=["fc1", "fc2"]))
    assert type(model.fc1) is nn.Linear


def test_an_int8_linear_is_refused_under_all_linear():
    model = tiny_bert()
    model.bert.encoder.layer[1].output.dense = Int8Linear(64, 32)
    with pytest.raises(TypeError, match=r"layer\.1\.output\.dense.*torch\.int8"):
        get_peft_model(model, fip_peft.FIPConfig(task_type="SEQ_CLS"))
    assert not any(isinstance(m, fip_peft.FIPLayer) for m in model.modules())


def test_a_torchscript_module_is_refused():
    model = MLP()
    model.fc1 = torch.jit.script(nn.Linear(64, 64))
    with pytest.raises(TypeError, match="TorchScript"):
        get_peft_model(model, fip_peft.FIPConfig(target_modules=["fc1"]))


def test_a_frozen_base_layer_is_adapted_and_its_weight_stays_frozen(digits):
    base = MLP()
    base.fc1.requires_grad_(False)
    model = get_peft_model(base, fip_peft.FIPConfig(target_modules=["fc1"]))
    weight = model.base_model.model.fc1.base_layer.weight.clone()
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    nn.functional.cross_entropy(model(digits["x_a_train"][:16]), digits["y_a_train"][:16]).backward()
    optimizer.step()
    assert model.base_model.model.fc1.fip_delta["default"].abs().sum() > 0
    assert torch.equal(model.base_model.model.fc1.base_layer.weight, weight)


# ---- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"beta": float("inf")}, ValueError, "beta must be finite"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite"),
        ({"init_weights": "no"}, TypeError, "init_weights"),
        ({"target_modules": 3}, TypeError, "target_modules"),
        ({"target_modules": ["fc1", 2]}, TypeError, "target_modules"),
        ({"modules_to_save": "head"}, TypeError, "modules_to_save"),
        ({"target_modules": ["fc1", "head"], "modules_to_save": ["head"]}, ValueError, "modules_to_save"),
    ],
)
def test_inconsistent_config_fields_raise_naming_them(kwargs, error, field):
    with pytest.raises(error, match=field):
        fip_peft.FIPConfig(**kwargs)


def test_an_adapter_config_from_a_newer_version_warns_about_unknown_fields_and_loads(tmp_path, digits):
    _, expected = saved_mlp(tmp_path, digits)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "anchor_compression": "zstd"}))
    with pytest.warns(UserWarning, match=r"\['anchor_compression'\].*newer fip_peft"):
        outputs = load_outputs(tmp_path, digits)
    torch.testing.assert_close(outputs, expected, atol=0, rtol=0)


# ---- NaN/inf during training ----------------------------------------------------------------------------------------


def optimizer_state(optimizer):
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in optimizer.state.values()
    ]


def step_on(model, optimizer, x, y):
    nn.functional.cross_entropy(logits_of(model, x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_nan_batch_in_a_plain_loop_skips_the_step_without_changing_anything(digits, caplog):
    model = mlp_model(anchor_budget=16)
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-2)
    model.train()
    step_on(model, optimizer, digits["x_b_train"][:16], digits["y_b_train"][:16])
    params, state = adapter_state(model), optimizer_state(optimizer)
    bad = digits["x_b_train"][16:32].clone()
    bad[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="fip_peft"):
        step_on(model, optimizer, bad, digits["y_b_train"][16:32])
    assert "FIP optimizer step 2" in caplog.text and "skipped" in caplog.text
    for name, value in adapter_state(model).items():
        assert torch.equal(value, params[name]), name
    for after, before in zip(optimizer_state(optimizer), state, strict=True):
        for key in before:
            assert torch.equal(torch.as_tensor(after[key]), torch.as_tensor(before[key])), key
    step_on(model, optimizer, digits["x_b_train"][32:48], digits["y_b_train"][32:48])
    assert all(torch.isfinite(v).all() for v in adapter_state(model).values())


def test_a_nan_batch_under_raise_stops_naming_the_step(digits):
    model = mlp_model(anchor_budget=16, on_nonfinite="raise")
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    model.train()
    step_on(model, optimizer, digits["x_b_train"][:16], digits["y_b_train"][:16])
    bad = digits["x_b_train"][16:32].clone()
    bad[3] = float("inf")
    with pytest.raises(NonFiniteStepError, match=r"step 2: the gradient of \d+ parameter tensors"):
        step_on(model, optimizer, bad, digits["y_b_train"][16:32])


def test_a_nan_anchor_distance_is_named(digits):
    model = mlp_model(anchor_budget=16, on_nonfinite="raise")
    model.remember(digits["x_a_train"])
    model.base_model.memory().reference[:] = float("nan")
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    model.train()
    with pytest.raises(NonFiniteStepError, match="step 1: the anchor distance D"):
        step_on(model, optimizer, digits["x_b_train"][:16], digits["y_b_train"][:16])


class LossMLP(MLP):
    """The test MLP returning a loss, as `Trainer` expects."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = super().forward(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@pytest.mark.parametrize("trainer_kind", ["FIPTrainer", "Trainer"])
def test_nan_batches_in_trainer_are_skipped_and_the_saved_adapter_is_finite(digits, tmp_path, caplog, trainer_kind):
    model = get_peft_model(LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16))
    model.remember(digits["x_a_train"])
    before = adapter_state(model)
    x = digits["x_b_train"][:64].clone()
    x[::16, 0] = float("nan")  # 4 poisoned rows
    dataset = Dataset.from_dict({"x": x.tolist(), "labels": digits["y_b_train"][:64].tolist()}).with_format("torch")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    if trainer_kind == "FIPTrainer":
        trainer = fip_peft.FIPTrainer(model=model, args=args, train_dataset=dataset)
    else:
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-2)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None))
    with caplog.at_level(logging.WARNING, logger="fip_peft"):
        trainer.train()
    assert "skipped" in caplog.text
    after = adapter_state(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert (tmp_path / "run" / "checkpoint-8" / "adapter_model.safetensors").is_file()  # saved through the checks
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# ---- saving ---------------------------------------------------------------------------------------------------------


def test_saving_nan_weights_is_refused_and_writes_nothing(tmp_path):
    model = mlp_model()
    with torch.no_grad():
        model.base_model.model.fc2.fip_delta["default"][1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"Refusing to save.*fc2\.fip_delta"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_saving_nan_in_the_anchor_memory_is_refused(tmp_path, digits):
    model = mlp_model(anchor_budget=8)
    model.remember(digits["x_a_train"])
    model.base_model.memory().reference[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"fip_memory\.reference"):
        model.save_pretrained(tmp_path / "adapter")


def saved_mlp(path, digits):
    torch.manual_seed(0)
    model = mlp_model(anchor_budget=8, init_weights=False)
    model.remember(digits["x_a_train"])
    model.save_pretrained(path)
    with torch.no_grad():
        return model, model.eval()(digits["x_b_test"][:5])


def load_outputs(path, digits):
    torch.manual_seed(0)  # the same base MLP as `saved_mlp`'s
    with torch.no_grad():
        return PeftModel.from_pretrained(MLP(), path).eval()(digits["x_b_test"][:5])


def test_a_crash_in_the_middle_of_saving_leaves_the_previous_adapter_loadable(tmp_path, digits, monkeypatch):
    import peft.peft_model

    path = tmp_path / "adapter"
    model, expected = saved_mlp(path, digits)
    with torch.no_grad():
        model.base_model.model.fc1.fip_delta["default"].add_(1.0)

    def crash_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    torch.testing.assert_close(load_outputs(path, digits), expected, atol=0, rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_saving_again_replaces_the_adapter_and_keeps_other_files(tmp_path, digits):
    path = tmp_path / "adapter"
    model, _ = saved_mlp(path, digits)
    (path / "notes.txt").write_text("mine")
    with torch.no_grad():
        model.base_model.model.fc1.fip_delta["default"].add_(1.0)
        expected = model(digits["x_b_test"][:5])
    model.save_pretrained(path)
    torch.testing.assert_close(load_outputs(path, digits), expected, atol=0, rtol=0)
    assert (path / "notes.txt").read_text() == "mine"


def test_other_peft_methods_save_as_peft_does(tmp_path, monkeypatch):
    import tempfile

    def no_staging(*args, **kwargs):
        raise AssertionError("a LoRA save must not be staged")

    monkeypatch.setattr(tempfile, "mkdtemp", no_staging)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["fc1"]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()


# ---- loading a broken adapter ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_a_corrupted_adapter_file_gives_a_clear_error_and_leaves_the_base_untouched(tmp_path, digits, damage):
    path = tmp_path / "adapter"
    saved_mlp(path, digits)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not safetensors" * 9}[damage])
    base = MLP()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is corrupted or truncated"):
        PeftModel.from_pretrained(base, path)
    assert not any(isinstance(m, fip_peft.FIPLayer) for m in base.modules())


def test_load_adapter_of_a_corrupted_file_adds_no_adapter(tmp_path, digits):
    path = tmp_path / "adapter"
    saved_mlp(path, digits)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    model = mlp_model()
    with pytest.raises(ValueError, match="corrupted or truncated"):
        model.load_adapter(path, adapter_name="second")
    assert set(model.peft_config) == {"default"}


def test_fip_trainer_does_not_advance_the_learning_rate_schedule_on_a_skipped_step(digits, tmp_path, caplog):
    model = get_peft_model(LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16))
    model.remember(digits["x_a_train"])
    x = digits["x_b_train"][:64].clone()
    x[::16, 0] = float("nan")
    dataset = Dataset.from_dict({"x": x.tolist(), "labels": digits["y_b_train"][:64].tolist()}).with_format("torch")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = fip_peft.FIPTrainer(model=model, args=args, train_dataset=dataset)
    with caplog.at_level(logging.WARNING, logger="fip_peft"):
        trainer.train()
    skipped = caplog.text.count("the step is skipped")
    assert 1 <= skipped < 8
    assert trainer.lr_scheduler.last_epoch == 8 - skipped
