"""objective="sparsify" defaults (issue 29): unset sparsity fields resolve to the measured recipe for the target;
the 2:4 pattern as a scope."""

import copy
import logging

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import fip_peft
from fip_peft.math.sparsity import nm_masks, recommended_recipe
from tests._tasks import MLP, train_plain

TARGETS = ["fc1", "fc2"]


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    return train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], steps=60, lr=3e-3)


def config(**settings) -> fip_peft.FIPConfig:
    return fip_peft.FIPConfig(target_modules=TARGETS, objective="sparsify", **settings)


@pytest.mark.parametrize(
    ("target", "recipe"),
    [
        (0.5, ("magnitude", "global", "cubic")),
        (0.7, ("magnitude", "global", "cubic")),
        (0.8, ("obs", "layer", "constant")),
        (0.9, ("saliency", "global", "cubic")),
    ],
)
def test_unset_fields_resolve_to_the_measured_recipe_for_the_target(target, recipe):
    resolved = config(target_sparsity=target)
    assert (resolved.sparsity_criterion, resolved.sparsity_scope, resolved.sparsity_schedule) == recipe
    assert resolved.sparsity_defaults == ["sparsity_criterion", "sparsity_schedule", "sparsity_scope"]
    assert recommended_recipe(target).learning_rate == (3e-4 if target < 0.6 else 1e-3)


def test_explicit_fields_are_kept_and_constrain_the_others():
    assert config(target_sparsity=0.8, sparsity_criterion="magnitude").sparsity_schedule == "cubic"
    assert config(target_sparsity=0.8, sparsity_criterion="magnitude").sparsity_scope == "global"
    global_scope = config(target_sparsity=0.8, sparsity_scope="global")  # obs needs one threshold per layer
    assert (global_scope.sparsity_criterion, global_scope.sparsity_defaults) == (
        "saliency",
        ["sparsity_criterion", "sparsity_schedule"],
    )
    cubic = config(target_sparsity=0.8, sparsity_schedule="cubic")
    assert (cubic.sparsity_criterion, cubic.sparsity_scope, cubic.sparsity_schedule) == ("obs", "layer", "cubic")


def test_a_config_saved_before_the_defaults_loads_identically(trained_mlp, tmp_path):
    old = {
        "target_sparsity": 0.8,
        "sparsity_criterion": "magnitude",
        "sparsity_scope": "global",
        "sparsity_schedule": "cubic",
    }
    loaded = config(**old)
    assert (loaded.sparsity_criterion, loaded.sparsity_scope, loaded.sparsity_schedule) == (
        "magnitude",
        "global",
        "cubic",
    )
    assert loaded.sparsity_defaults == []
    model = get_peft_model(copy.deepcopy(trained_mlp), config(target_sparsity=0.8))
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(copy.deepcopy(trained_mlp), tmp_path).peft_config["default"]
    for name in ("sparsity_criterion", "sparsity_scope", "sparsity_schedule", "sparsity_defaults"):
        assert getattr(again, name) == getattr(model.peft_config["default"], name)


def test_a_resolved_metric_criterion_without_anchors_is_refused_naming_the_fix(trained_mlp):
    model = get_peft_model(copy.deepcopy(trained_mlp), config(target_sparsity=0.9))
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.Adam, lr=1e-3)
    with pytest.raises(ValueError, match=r"sparsity_criterion.*'saliency'.*remember.*sparsity_criterion='magnitude'"):
        for _ in range(20):
            optimizer.zero_grad()
            optimizer.step()


class EmbedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids)).mean(1)


def test_a_resolved_obs_meeting_embeddings_switches_to_saliency_with_a_warning(caplog):
    torch.manual_seed(0)
    settings = fip_peft.FIPConfig(target_modules=["embed", "fc"], objective="sparsify", target_sparsity=0.8)
    model = get_peft_model(EmbedLinear(), settings)
    model.remember(torch.randint(0, 20, (16, 5)))
    with caplog.at_level(logging.WARNING):
        model.apply_sparsity_mask()
    assert "using sparsity_criterion='saliency'" in caplog.text
    assert model.peft_config["default"].sparsity_criterion == "saliency"
    assert model.sparsity_report()["sparsity"] == pytest.approx(0.8, abs=0.02)


def test_an_explicit_obs_meeting_embeddings_is_still_refused():
    settings = fip_peft.FIPConfig(
        target_modules=["embed", "fc"], objective="sparsify", target_sparsity=0.8, sparsity_criterion="obs"
    )
    model = get_peft_model(EmbedLinear(), settings)
    model.remember(torch.randint(0, 20, (16, 5)))
    with pytest.raises(ValueError, match="cannot prune embeddings"):
        model.apply_sparsity_mask()


# ---- 2:4 ------------------------------------------------------------------------------------------------------------


def pruned_per_group(model: PeftModel) -> list[torch.Tensor]:
    """Pruned entries in each group of 4 consecutive inputs of every target weight's rows."""
    layers = [getattr(model.base_model.model, name) for name in TARGETS]
    return [(~layer.fip_mask["default"]).reshape(64, -1, 4).sum(-1) for layer in layers]


def zeros_per_group(model: nn.Module) -> list[torch.Tensor]:
    return [(getattr(model, name).weight == 0).reshape(-1, 16, 4).sum(-1) for name in TARGETS]


def test_nm_masks_prune_two_of_every_four_and_ramp_inside_the_pattern():
    torch.manual_seed(0)
    scores = {"w": torch.rand(6, 16)}
    full = nm_masks(scores, 0.5, (2, 4))["w"]
    assert ((~full).reshape(6, 4, 4).sum(-1) == 2).all()
    kept = scores["w"].reshape(6, 4, 4).sort(-1).values[..., 2:]
    assert torch.equal(scores["w"][full].reshape(6, 4, 2).sort(-1).values, kept)
    half = nm_masks(scores, 0.25, (2, 4))["w"]
    assert int((~half).sum()) == 24 and (~half & full).sum() == 0
    again = nm_masks(scores, 0.5, (2, 4), pruned={"w": ~half})["w"]
    assert ((~again).reshape(6, 4, 4).sum(-1) == 2).all() and not (~half & again).any()


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"sparsity_criterion": "magnitude"}, id="magnitude-cubic"),
        pytest.param({"sparsity_criterion": "saliency"}, id="saliency-cubic"),
        pytest.param({}, id="default-obs"),
    ],
)
def test_two_four_holds_in_every_group_through_the_walk_merge_and_save(trained_mlp, digits, tmp_path, settings):
    model = get_peft_model(
        copy.deepcopy(trained_mlp),
        config(sparsity_scope="2:4", sparsity_ramp_steps=10, sparsity_update_every=2, **settings),
    )
    assert model.peft_config["default"].target_sparsity == 0.5
    model.remember(digits["x_a_train"][:128])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.Adam, lr=1e-2)
    for _ in range(16):
        optimizer.zero_grad()
        optimizer.step()
        assert all((groups <= 2).all() for groups in pruned_per_group(model))
    assert all((groups == 2).all() for groups in pruned_per_group(model))
    assert model.sparsity_report()["sparsity"] == pytest.approx(0.5, abs=1e-3)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(trained_mlp), tmp_path)
    assert all((groups == 2).all() for groups in pruned_per_group(loaded))
    x = digits["x_a_test"]
    merged = loaded.merge_and_unload()
    assert all((groups >= 2).all() for groups in zeros_per_group(merged))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"sparsity_scope": "2:4", "target_sparsity": 0.8}, r"sparsity_scope='2:4'.*target_sparsity=0.8"),
        ({"sparsity_scope": "2:4", "sparsity_schedule": "cubic", "sparsity_criterion": "obs"}, "constant"),
        ({"sparsity_scope": "global", "sparsity_criterion": "obs", "target_sparsity": 0.8}, "sparsity_scope"),
    ],
)
def test_conflicting_two_four_settings_are_refused_with_the_field(settings, match):
    with pytest.raises(ValueError, match=match):
        config(**settings)


def test_two_four_needs_inputs_in_groups_of_four():
    model = get_peft_model(
        nn.Sequential(nn.Linear(6, 4)),
        fip_peft.FIPConfig(
            target_modules=["0"], objective="sparsify", sparsity_scope="2:4", sparsity_criterion="magnitude"
        ),
    )
    with pytest.raises(ValueError, match="groups of 4"):
        model.apply_sparsity_mask()
