"""objective="sparsify": magnitude masks on the target weights, reached along a functionally invariant path."""

import copy
import logging

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import TrainingArguments, get_linear_schedule_with_warmup

import fip_peft
from fip_peft.math.sparsity import BAND_SELECT_MIN, kth_smallest, magnitude_masks, scheduled_sparsity
from tests._tasks import (
    MLP,
    as_tokens,
    assert_same_walk,
    logits_of,
    resumed_and_uninterrupted,
    sparsify_bert,
    sparsify_trainer,
    train_plain,
)

TARGETS = ["fc1", "fc2"]


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    return train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], steps=60, lr=3e-3)


# The magnitude walk these tests are about (at 0.8 unset fields resolve to obs: tests/test_sparsity_defaults.py)
MAGNITUDE = {"sparsity_criterion": "magnitude", "sparsity_scope": "global", "sparsity_schedule": "cubic"}


def sparsify_model(base: nn.Module, **config) -> PeftModel:
    settings = {"target_sparsity": 0.8, "sparsity_ramp_steps": 20, "sparsity_update_every": 5} | MAGNITUDE | config
    return get_peft_model(
        copy.deepcopy(base), fip_peft.FIPConfig(target_modules=TARGETS, objective="sparsify", **settings)
    )


def walk(model: PeftModel, steps: int, anchors: torch.Tensor | None = None, lr: float = 1e-3) -> PeftModel:
    """The sparsifying walk with no task loss: `zero_grad(); step()` (the anchor term and the pull only)."""
    if anchors is not None:
        model.remember(anchors)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.Adam, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        optimizer.step()
    return model


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return logits_of(model, x)


def counted_sparsity(model: nn.Module, names=TARGETS) -> float:
    weights = [getattr(model, name).weight for name in names]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_cubic_schedule_ramps_from_zero_to_target_and_stays():
    values = [scheduled_sparsity(t, 0.9, "cubic", begin_step=10, ramp_steps=20) for t in (0, 10, 20, 30, 50)]
    assert values == pytest.approx([0.0, 0.0, 0.9 * (1 - 0.5**3), 0.9, 0.9])


def test_linear_and_constant_schedules():
    assert scheduled_sparsity(5, 0.8, "linear", ramp_steps=10) == pytest.approx(0.4)
    assert scheduled_sparsity(1, 0.8, "constant", ramp_steps=10) == pytest.approx(0.8)


def test_global_masks_keep_the_largest_magnitudes_over_all_weights():
    weights = {"a": torch.tensor([[0.1, -5.0], [0.2, 3.0]]), "b": torch.tensor([[-0.3, 4.0]])}
    masks = magnitude_masks(weights, sparsity=0.5, scope="global")
    assert masks["a"].tolist() == [[False, True], [False, True]]
    assert masks["b"].tolist() == [[False, True]]


@pytest.mark.parametrize("fraction", [0.0, 1e-6, 0.5, 0.8, 0.9, 0.99, 1.0])
@pytest.mark.parametrize(
    "values",
    [
        lambda g: torch.randn(BAND_SELECT_MIN + 12345, generator=g).abs(),
        lambda g: torch.randint(0, 50, (BAND_SELECT_MIN * 2,), generator=g).float(),  # many ties
        lambda g: torch.cat([torch.zeros(BAND_SELECT_MIN), torch.rand(BAND_SELECT_MIN // 3, generator=g)]),
        # a mask already at 80%: the k-th smallest is one of the tied zeros
        lambda g: torch.cat([torch.zeros(4 * BAND_SELECT_MIN), torch.rand(BAND_SELECT_MIN, generator=g)])[
            torch.randperm(5 * BAND_SELECT_MIN, generator=g)
        ],
    ],
    ids=["continuous", "ties", "mostly-zero", "pruned-to-80%"],
)
def test_kth_smallest_of_millions_of_entries_is_exactly_kthvalue(values, fraction):
    values = values(torch.Generator().manual_seed(0))
    k = min(values.numel(), max(1, int(fraction * values.numel())))
    assert kth_smallest(values, k) == values.kthvalue(k).values


def test_layer_masks_prune_each_weight_to_the_sparsity():
    weights = {"a": torch.arange(1.0, 11.0).view(2, 5), "b": torch.arange(100.0, 110.0).view(5, 2)}
    masks = magnitude_masks(weights, sparsity=0.3, scope="layer")
    assert [int((~m).sum()) for m in masks.values()] == [3, 3]


def test_merged_model_has_exactly_the_reported_sparsity(trained_mlp, digits):
    model = walk(sparsify_model(trained_mlp), steps=20, anchors=digits["x_a_train"])
    report = model.sparsity_report()
    before = outputs(model, digits["x_a_test"])
    merged = model.merge_and_unload()
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert counted_sparsity(merged) == report["sparsity"]
    assert {name: entry["sparsity"] for name, entry in report["layers"].items()} == {
        f"{name}": counted_sparsity(merged, [name]) for name in TARGETS
    }
    assert torch.allclose(outputs(merged, digits["x_a_test"]), before, atol=1e-5)


def test_heads_and_biases_are_not_counted_unless_targeted(trained_mlp):
    model = sparsify_model(trained_mlp)
    model.apply_sparsity_mask(0.5)
    assert set(model.sparsity_report()["layers"]) == set(TARGETS)
    assert counted_sparsity(model.merge_and_unload(), ["head"]) == 0.0


def test_unmerge_restores_the_base_weights(trained_mlp):
    model = sparsify_model(trained_mlp)
    model.apply_sparsity_mask(0.6)
    model.merge_adapter()
    assert counted_sparsity(model.base_model.model) == pytest.approx(0.6, abs=1e-3)
    model.unmerge_adapter()
    for name in TARGETS:
        torch.testing.assert_close(
            getattr(model.base_model.model, name).base_layer.weight, getattr(trained_mlp, name).weight
        )


def sparsity_after_each_step(model: PeftModel, anchors: torch.Tensor, steps: int) -> list[float]:
    """The reported sparsity after each of `steps` walk steps (Adam, no task loss) on remembered `anchors`."""
    model.remember(anchors)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.Adam, lr=1e-3)
    reached = []
    for _ in range(steps):
        optimizer.zero_grad()
        optimizer.step()
        reached.append(model.sparsity_report()["sparsity"])
    return reached


def test_sparsity_follows_the_schedule_at_every_mask_update(trained_mlp, digits):
    model = sparsify_model(trained_mlp, target_sparsity=0.9, sparsity_ramp_steps=12, sparsity_update_every=3)
    reached = sparsity_after_each_step(model, digits["x_a_train"], 15)
    expected, current = [], 0.0
    for step in range(1, 16):
        if step % 3 == 0:
            current = scheduled_sparsity(step, 0.9, "cubic", ramp_steps=12)
        expected.append(current)
    assert reached == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("schedule", "begin"),
    [("constant", 0), ("constant", 3), ("cubic", 0)],
    ids=["constant", "constant-later", "no-ramp"],
)
def test_a_schedule_without_ramp_prunes_to_the_target_at_its_first_step(trained_mlp, digits, schedule, begin):
    model = sparsify_model(
        trained_mlp,
        sparsity_schedule=schedule,
        sparsity_begin_step=begin,
        sparsity_ramp_steps=0 if schedule == "cubic" else 20,
        sparsity_update_every=5,
    )
    reached = sparsity_after_each_step(model, digits["x_a_train"], 4)
    first = max(begin, 1)
    assert reached == pytest.approx([0.8 if step >= first else 0.0 for step in range(1, 5)], abs=1e-3)


def _at_target(trained_mlp, digits) -> tuple[PeftModel, torch.optim.Optimizer]:
    """A walk whose mask reached its target (80% after a 6-step ramp) and a few steps more."""
    model = sparsify_model(trained_mlp, sparsity_ramp_steps=6, sparsity_update_every=2)
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.Adam, lr=1e-3)
    for _ in range(8):
        optimizer.zero_grad()
        optimizer.step()
    return model, optimizer


def test_pull_is_zero_once_the_mask_is_at_the_target(trained_mlp, digits):
    model, _ = _at_target(trained_mlp, digits)
    layers = {name: getattr(model.base_model.model, name) for name in TARGETS}
    weights = {name: layer.sparse_weight("default") for name, layer in layers.items()}
    target = magnitude_masks(weights, 0.8)
    grads = {}
    for name, layer in layers.items():
        assert not (weights[name] * ~target[name]).any()  # lambda (w - P(w)) vanishes entrywise
        grads[name] = torch.randn_like(layer.fip_delta["default"])
        layer.fip_delta["default"].grad = grads[name].clone()
    model.sparsity_step()
    for name, layer in layers.items():
        assert torch.equal(layer.fip_delta["default"].grad, grads[name])


def test_no_projection_is_computed_once_the_mask_is_at_the_target(trained_mlp, digits, monkeypatch):
    model, optimizer = _at_target(trained_mlp, digits)
    masks = {name: getattr(model.base_model.model, name).fip_mask["default"].clone() for name in TARGETS}
    calls = []
    monkeypatch.setattr(fip_peft.method.sparsifier, "score_masks", lambda *args, **kwargs: calls.append(args))
    for _ in range(4):
        optimizer.zero_grad()
        optimizer.step()
    assert calls == []
    for name in TARGETS:
        assert torch.equal(getattr(model.base_model.model, name).fip_mask["default"], masks[name])
    assert model.sparsity_report()["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_mask_survives_save_and_load(trained_mlp, digits, tmp_path):
    model = walk(sparsify_model(trained_mlp), steps=20, anchors=digits["x_a_train"])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(trained_mlp), tmp_path)
    for name in TARGETS:
        saved = getattr(model.base_model.model, name).fip_mask["default"]
        assert torch.equal(getattr(loaded.base_model.model, name).fip_mask["default"], saved)
    assert loaded.sparsity_report()["sparsity"] == model.sparsity_report()["sparsity"]
    assert torch.equal(outputs(loaded, digits["x_a_test"]), outputs(model, digits["x_a_test"]))


def test_fip_keeps_outputs_closer_than_magnitude_pruning_at_equal_sparsity(trained_mlp, digits):
    x = digits["x_a_test"]
    dense = outputs(trained_mlp, x)
    fip = walk(sparsify_model(trained_mlp, sparsity_ramp_steps=20), steps=30, anchors=digits["x_a_train"])
    one_shot = sparsify_model(trained_mlp)
    one_shot.apply_sparsity_mask(0.8)
    assert fip.sparsity_report()["sparsity"] == one_shot.sparsity_report()["sparsity"]
    fip_change = (outputs(fip, x) - dense).pow(2).mean()
    pruned_change = (outputs(one_shot, x) - dense).pow(2).mean()
    assert fip_change < 0.5 * pruned_change


@pytest.mark.parametrize(("lr", "warns"), [(1e-4, True), (1e-1, False)])
def test_adam_warns_when_lr_times_ramp_is_below_the_size_of_the_weights_to_prune(
    trained_mlp, digits, caplog, lr, warns
):
    model = sparsify_model(trained_mlp)
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.Adam, lr=lr)
    with caplog.at_level(logging.WARNING, logger="fip_peft"):
        optimizer.step()
    assert ("Raise the learning rate or FIPConfig.sparsity_ramp_steps" in caplog.text) == warns


@pytest.mark.parametrize(("begin", "warns"), [(0, False), (3, True)])
def test_constant_schedule_warns_only_when_a_pull_runs_before_the_cut(trained_mlp, digits, caplog, begin, warns):
    model = sparsify_model(trained_mlp, sparsity_schedule="constant", sparsity_begin_step=begin)
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.Adam, lr=1e-4)
    with caplog.at_level(logging.WARNING, logger="fip_peft"):
        optimizer.step()
    assert ("Raise the learning rate or FIPConfig.sparsity_begin_step" in caplog.text) == warns


def test_pace_warning_reads_the_peak_lr_of_a_warmup_schedule(trained_mlp, digits, caplog):
    model = sparsify_model(trained_mlp)
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.Adam, lr=1e-1)
    get_linear_schedule_with_warmup(optimizer, num_warmup_steps=5, num_training_steps=20)
    assert optimizer.param_groups[0]["lr"] == 0.0
    with caplog.at_level(logging.WARNING, logger="fip_peft"):
        optimizer.step()
    assert "Raise the learning rate" not in caplog.text


def test_fip_trainer_sparsifies_with_the_task_loss(digits, tmp_path):
    tokens = as_tokens(digits["x_a_train"][:64])
    model = sparsify_bert(tokens, sparsity_update_every=2, anchor_batch_size=16)
    data = Dataset.from_dict({**{k: v.tolist() for k, v in tokens.items()}, "labels": digits["y_a_train"][:64]})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=16, report_to=[], save_strategy="no"
    )
    fip_peft.FIPTrainer(model=model, args=args, train_dataset=data).train()
    report = model.sparsity_report()
    assert report["step"] == 4
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)


class EmbedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.conv(self.embed(ids).unsqueeze(1)).flatten(1)


def test_embedding_and_conv2d_weights_are_pruned_and_merge_exactly():
    torch.manual_seed(0)
    config = fip_peft.FIPConfig(target_modules=["embed", "conv"], objective="sparsify", target_sparsity=0.5)
    model = get_peft_model(EmbedConv(), config)
    model.apply_sparsity_mask()
    ids = torch.randint(0, 20, (3, 6))
    outputs = model(ids).detach()
    merged = model.merge_and_unload()
    assert counted_sparsity(merged, ["embed", "conv"]) == pytest.approx(0.5, abs=0.01)
    assert torch.allclose(merged(ids), outputs, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "error", "field"),
    [
        ({"target_sparsity": None}, ValueError, "target_sparsity"),
        ({"target_sparsity": 1.0}, ValueError, "target_sparsity"),
        ({"target_sparsity": -0.1}, ValueError, "target_sparsity"),
        ({"target_sparsity": "0.5"}, TypeError, "target_sparsity"),
        ({"rank": 4}, ValueError, "rank"),
        ({"sparsity_schedule": "exponential"}, ValueError, "sparsity_schedule"),
        ({"sparsity_scope": "row"}, ValueError, "sparsity_scope"),
        ({"sparsity_update_every": 0}, ValueError, "sparsity_update_every"),
        ({"sparsity_lambda": -1.0}, ValueError, "sparsity_lambda"),
    ],
)
def test_bad_sparsify_settings_raise_errors_naming_the_field(settings, error, field):
    with pytest.raises(error, match=field):
        fip_peft.FIPConfig(target_modules=TARGETS, objective="sparsify", **({"target_sparsity": 0.5} | settings))


def test_target_sparsity_without_the_sparsify_objective_is_refused():
    with pytest.raises(ValueError, match="objective='sparsify'"):
        fip_peft.FIPConfig(target_modules=TARGETS, target_sparsity=0.5)


def test_targets_that_match_nothing_are_refused_before_any_change():
    base = MLP()
    config = fip_peft.FIPConfig(target_modules=["missing"], objective="sparsify", target_sparsity=0.5)
    with pytest.raises(ValueError, match="(?i)target.modules"):
        get_peft_model(base, config)
    assert isinstance(base.fc1, nn.Linear)


def test_sparsity_report_of_a_continual_adapter_is_refused():
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="objective='sparsify'"):
        model.sparsity_report()


def test_sparsify_adapter_must_be_the_only_adapter():
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="only adapter"):
        model.add_adapter(
            "sparse", fip_peft.FIPConfig(target_modules=TARGETS, objective="sparsify", target_sparsity=0.5)
        )


def test_fip_trainer_sparsifies_a_dataset_without_labels(digits, tmp_path):
    tokens = as_tokens(digits["x_a_train"][:64])
    model = sparsify_bert(tokens)
    unlabelled = Dataset.from_dict({k: v.tolist() for k, v in tokens.items()})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = sparsify_trainer(model, unlabelled, tmp_path, logging_steps=1)
    trainer.train()
    assert model.sparsity_report()["step"] == 4
    assert model.sparsity_report()["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(entry["loss"] == 0 for entry in trainer.state.log_history if "loss" in entry)
    assert any(entry.get("fip_distance", 0) > 0 for entry in trainer.state.log_history)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_resuming_continues_the_sparsity_schedule_as_an_uninterrupted_run(digits, tmp_path):
    tokens = as_tokens(digits["x_a_train"][:64])
    resumed, uninterrupted = resumed_and_uninterrupted(tokens, tmp_path)
    assert resumed.sparsity_report()["step"] == uninterrupted.sparsity_report()["step"] == 4
    assert_same_walk(resumed, uninterrupted)
