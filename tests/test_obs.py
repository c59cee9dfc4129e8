"""`sparsity_criterion="obs"`: prune each layer by optimal brain surgeon under the metric's input factor, the kept
entries of each row making up for the pruned ones."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import fip_peft
from fip_peft.math.saliency import OBS_DAMPING, obs_input_weights, obs_inverse_factor, obs_prune
from tests._tasks import MLP, train_plain
from tests.test_sparsify import EmbedConv


def correlated_inputs(rows: int = 200, width: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows, width) @ torch.randn(width, width)


def damped_inverse(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(a + OBS_DAMPING * a.diagonal().mean() * torch.eye(a.shape[0]))


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    return train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], steps=60, lr=3e-3)


def sparsify_mlp(base, criterion: str):
    config = fip_peft.FIPConfig(
        target_modules=["fc1", "fc2"],
        objective="sparsify",
        target_sparsity=0.8,
        sparsity_scope="layer",
        sparsity_criterion=criterion,
    )
    return get_peft_model(copy.deepcopy(base), config)


def test_pruning_one_entry_of_the_first_column_is_the_optimal_brain_surgeon_update():
    x = correlated_inputs()
    a = x.T @ x / len(x)
    weight = torch.randn(1, 8)
    pruned = torch.zeros(1, 8, dtype=torch.bool)
    pruned[0, 0] = True
    got, got_pruned = obs_prune(weight, obs_inverse_factor(a), 1 / 8, pruned)
    inverse = damped_inverse(a)
    expected = weight - weight[0, 0] / inverse[0, 0] * inverse[0:1, :]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(got_pruned, pruned)


def test_with_isotropic_inputs_the_smallest_entries_of_each_block_go_and_nothing_else_moves():
    torch.manual_seed(0)
    weight = torch.randn(6, 8)
    got, pruned = obs_prune(
        weight, obs_inverse_factor(torch.eye(8)), 0.5, torch.zeros(6, 8, dtype=torch.bool), block=4
    )
    for start in (0, 4):
        block = weight[:, start : start + 4].abs().flatten()
        expected = block <= block.kthvalue(12).values
        assert torch.equal(pruned[:, start : start + 4].flatten(), expected)
    torch.testing.assert_close(got, weight.masked_fill(pruned, 0.0))


def test_obs_keeps_earlier_pruned_entries_and_prunes_the_asked_count():
    x = correlated_inputs()
    torch.manual_seed(1)
    weight = torch.randn(5, 8)
    earlier = torch.rand(5, 8) < 0.3
    got, pruned = obs_prune(weight, obs_inverse_factor(x.T @ x / len(x)), 0.6, earlier, block=3)
    assert bool((pruned | ~earlier).all())
    assert int(pruned.sum()) == round(0.6 * 40)
    assert torch.equal(got == 0, pruned)


def test_compensation_moves_the_layer_outputs_less_than_zeroing_the_same_entries():
    x = correlated_inputs()
    torch.manual_seed(2)
    weight = torch.randn(5, 8)
    got, pruned = obs_prune(weight, obs_inverse_factor(x.T @ x / len(x)), 0.5, torch.zeros(5, 8, dtype=torch.bool))
    compensated = (x @ (weight - got).T).pow(2).mean()
    zeroed = (x @ (weight * pruned).T).pow(2).mean()
    assert compensated < zeroed


def test_obs_input_weights_are_the_inverse_diagonal_of_the_damped_inverse():
    x = correlated_inputs()
    a = x.T @ x / len(x)
    torch.testing.assert_close(
        obs_input_weights(obs_inverse_factor(a)), 1 / damped_inverse(a).diagonal(), rtol=1e-4, atol=1e-6
    )


def test_obs_mask_moves_the_anchor_outputs_less_than_the_saliency_and_magnitude_masks(digits, trained_mlp):
    changes = {}
    for criterion in ("magnitude", "saliency", "obs"):
        model = sparsify_mlp(trained_mlp, criterion)
        model.remember(digits["x_a_train"])
        before = model.eval()(digits["x_a_train"]).detach()
        model.apply_sparsity_mask(0.8)
        changes[criterion] = float((model(digits["x_a_train"]).detach() - before).pow(2).sum(-1).mean())
    assert changes["obs"] < changes["saliency"] < changes["magnitude"]


def test_obs_mask_has_the_asked_sparsity_in_every_layer_and_merges_to_the_same_function(digits, trained_mlp):
    model = sparsify_mlp(trained_mlp, "obs")
    model.remember(digits["x_a_train"])
    model.apply_sparsity_mask(0.6)
    report = model.sparsity_report()
    outputs = model.eval()(digits["x_a_test"]).detach()
    merged = model.merge_and_unload()
    for name, layer in report["layers"].items():
        assert layer["sparsity"] == pytest.approx(0.6, abs=1e-3), name
        assert int((merged.get_submodule(name).weight == 0).sum()) == layer["zeros"]
    torch.testing.assert_close(merged(digits["x_a_test"]), outputs)


def test_obs_with_one_global_threshold_is_refused_naming_sparsity_scope():
    with pytest.raises(ValueError, match=r"sparsity_criterion='obs'.*sparsity_scope='layer'"):
        fip_peft.FIPConfig(
            objective="sparsify", target_sparsity=0.5, sparsity_criterion="obs", sparsity_scope="global"
        )


def test_obs_on_an_embedding_is_refused_before_any_change():
    torch.manual_seed(0)
    config = fip_peft.FIPConfig(
        target_modules=["embed", "conv"],
        objective="sparsify",
        target_sparsity=0.5,
        sparsity_scope="layer",
        sparsity_criterion="obs",
    )
    model = get_peft_model(EmbedConv(), config)
    model.remember(torch.randint(0, 20, (8, 6)))
    with pytest.raises(ValueError, match=r"cannot prune embeddings \['.*embed'\].*target_modules"):
        model.apply_sparsity_mask()
    assert model.sparsity_report()["sparsity"] == 0.0


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.head = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_obs_prunes_a_convolution_through_its_patches_with_less_output_change_than_magnitude(digits):
    images = digits["x_a_train"][:128].reshape(-1, 1, 8, 8).repeat(1, 2, 1, 1)
    torch.manual_seed(0)
    base = SmallCNN()
    changes = {}
    for criterion in ("magnitude", "obs"):
        config = fip_peft.FIPConfig(
            target_modules=["conv"],
            objective="sparsify",
            target_sparsity=0.7,
            sparsity_scope="layer",
            sparsity_criterion=criterion,
        )
        model = get_peft_model(copy.deepcopy(base), config)
        model.remember(images)
        before = model.eval()(images).detach()
        model.apply_sparsity_mask()
        after = model(images).detach()
        changes[criterion] = float((after - before).pow(2).sum(-1).mean())
        zeros = model.sparsity_report()["zeros"]
        merged = model.merge_and_unload()
        assert int((merged.conv.weight == 0).sum()) == zeros
        torch.testing.assert_close(merged(images), after)
    assert changes["obs"] < changes["magnitude"]
