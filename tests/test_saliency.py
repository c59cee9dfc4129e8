"""`sparsity_criterion="saliency"`: prune the entries whose removal moves the anchor outputs least, by the metric.
What it shares with `"obs"` (anchors needed, the walk, resuming) is tested for both here."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import fip_peft
from fip_peft.math.saliency import metric_saliency
from fip_peft.method.metric import fip_covered_layer, gather_factors
from tests._tasks import MLP, as_tokens, assert_same_walk, resumed_and_uninterrupted, sparsify_bert, train_plain


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    return train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], steps=60, lr=3e-3)


# The criteria scored on the anchors' metric, with the scope each takes.
METRIC_CRITERIA = [
    pytest.param({"sparsity_criterion": "saliency"}, id="saliency"),
    pytest.param({"sparsity_criterion": "obs", "sparsity_scope": "layer"}, id="obs"),
]


def sparsify_mlp(base: nn.Module, criterion: str = "saliency", **settings) -> nn.Module:
    config = fip_peft.FIPConfig(
        target_modules=["fc1", "fc2"],
        objective="sparsify",
        target_sparsity=0.8,
        **({"sparsity_criterion": criterion} | settings),
    )
    return get_peft_model(copy.deepcopy(base), config)


def test_saliency_of_an_entry_is_the_mean_squared_output_change_when_it_alone_is_zeroed():
    torch.manual_seed(0)
    model = get_peft_model(
        OneLayer(), fip_peft.FIPConfig(target_modules=["fc"], objective="sparsify", target_sparsity=0.5)
    )
    anchors = torch.randn(40, 6)
    model.remember(anchors)
    layer = model.base_model.model.fc
    covered = {"fc": fip_covered_layer("fc", layer, layer.fip_delta["default"])}
    factors = gather_factors(model.base_model, "default", covered, torch.arange(40), seed=0, diagonal_only=True)
    weight = layer.sparse_weight("default")
    saliency = metric_saliency(covered["fc"], weight, *factors.diagonals()["fc"])
    expected = torch.empty_like(weight)
    for i in range(3):
        for j in range(6):
            expected[i, j] = (weight[i, j] * anchors[:, j]).pow(2).mean()
    torch.testing.assert_close(saliency, expected)


def test_diagonal_only_factors_are_the_diagonals_of_the_full_factors(digits, trained_mlp):
    model = sparsify_mlp(trained_mlp, "saliency")
    model.remember(digits["x_a_train"][:64])
    layers = {
        name: fip_covered_layer(name, module, module.fip_delta["default"])
        for name, module in [("fc1", model.base_model.model.fc1), ("fc2", model.base_model.model.fc2)]
    }
    index = torch.arange(64)
    full = gather_factors(model.base_model, "default", layers, index, seed=3)
    diagonal = gather_factors(model.base_model, "default", layers, index, seed=3, diagonal_only=True)
    for name in layers:
        for got, want in zip(diagonal.diagonals()[name], full.diagonals()[name], strict=True):
            torch.testing.assert_close(got, want)


def test_saliency_mask_moves_the_anchor_outputs_less_than_the_magnitude_mask(digits, trained_mlp):
    changes = {}
    for criterion in ("magnitude", "saliency"):
        model = sparsify_mlp(trained_mlp, criterion)
        model.remember(digits["x_a_train"])
        before = model.eval()(digits["x_a_train"]).detach()
        model.apply_sparsity_mask(0.8)
        changes[criterion] = float((model(digits["x_a_train"]).detach() - before).pow(2).sum(-1).mean())
    assert changes["saliency"] < changes["magnitude"]


def test_saliency_mask_has_the_asked_sparsity(digits, trained_mlp):
    model = sparsify_mlp(trained_mlp, "saliency")
    model.remember(digits["x_a_train"])
    assert model.apply_sparsity_mask(0.6) == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize("settings", METRIC_CRITERIA)
def test_metric_criterion_without_remembered_anchors_is_refused_naming_remember(trained_mlp, settings):
    model = sparsify_mlp(trained_mlp, **settings)
    criterion = settings["sparsity_criterion"]
    with pytest.raises(ValueError, match=rf"sparsity_criterion='{criterion}'.*model\.remember"):
        model.apply_sparsity_mask(0.5)
    assert model.sparsity_report()["sparsity"] == 0.0


def test_unknown_criterion_is_refused_naming_the_choices():
    with pytest.raises(
        ValueError, match=r"FIPConfig.sparsity_criterion must be one of \('magnitude', 'saliency', 'obs'\)"
    ):
        fip_peft.FIPConfig(objective="sparsify", target_sparsity=0.5, sparsity_criterion="movement")


@pytest.mark.parametrize("settings", METRIC_CRITERIA)
def test_walk_with_a_metric_criterion_reaches_the_target_and_merges_to_that_many_zeros(digits, settings):
    model = sparsify_bert(as_tokens(digits["x_a_train"][:64]), **settings)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        optimizer.step()
    report = model.sparsity_report()
    merged = model.merge_and_unload()
    zeros = {name: int((merged.get_submodule(name).weight == 0).sum()) for name in report["layers"]}
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert zeros == {name: layer["zeros"] for name, layer in report["layers"].items()}
    if settings.get("sparsity_scope") == "layer":
        assert all(layer["sparsity"] == pytest.approx(0.5, abs=1e-3) for layer in report["layers"].values())


def test_walk_with_saliency_and_no_anchors_is_refused_at_the_first_step_before_any_change(trained_mlp):
    model = sparsify_mlp(trained_mlp, "saliency")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match=r"model\.remember"):
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    assert model.sparsity_report()["step"] == 0


@pytest.mark.parametrize("settings", METRIC_CRITERIA)
def test_resuming_between_mask_updates_repeats_the_uninterrupted_walk(digits, tmp_path, settings):
    tokens = as_tokens(digits["x_a_train"][:64])
    assert_same_walk(
        *resumed_and_uninterrupted(tokens, tmp_path, sparsity_update_every=2, sparsity_ramp_steps=6, **settings)
    )
