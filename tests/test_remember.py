"""`remember` keeps anchors from any common data format, within budget, and records reference outputs."""

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, TensorDataset

from tests._tasks import as_tokens, bert_model, mlp_model


def test_tensor_data_is_stored_as_positional_anchors(digits):
    model = mlp_model(anchor_budget=50)
    summary = model.remember(digits["x_a_train"])
    assert summary == {"anchors_per_task": [50], "total": 50, "labelled": 0}
    assert model.base_model.memory().input_names == ["_positional"]


def test_reference_outputs_are_the_current_outputs_on_the_anchors(digits):
    model = mlp_model(anchor_budget=20, init_weights=False)
    model.remember(digits["x_a_train"])
    memory = model.base_model.memory()
    with torch.no_grad():
        expected = model.eval()(memory.inputs["_positional"])
    torch.testing.assert_close(memory.reference, expected)


def test_dict_of_tensors_is_accepted(digits):
    model = bert_model(anchor_budget=16)
    model.remember(as_tokens(digits["x_a_train"]))
    assert set(model.base_model.memory().input_names) == {"input_ids", "attention_mask"}


def test_dataset_uses_only_the_model_input_columns(digits):
    tokens = as_tokens(digits["x_a_train"][:30])
    dataset = Dataset.from_dict(
        {
            "input_ids": tokens["input_ids"].tolist(),
            "attention_mask": tokens["attention_mask"].tolist(),
            "text": ["digit"] * 30,
            "label": digits["y_a_train"][:30].tolist(),
        }
    )
    model = bert_model(anchor_budget=10)
    assert model.remember(dataset)["total"] == 10
    assert set(model.base_model.memory().input_names) == {"input_ids", "attention_mask"}


def test_dataset_rows_of_different_lengths_are_padded():
    dataset = Dataset.from_dict(
        {"input_ids": [[1, 5, 6], [1, 7], [1, 8, 9, 10]], "attention_mask": [[1, 1, 1], [1, 1], [1, 1, 1, 1]]}
    )
    model = bert_model(anchor_budget=3)
    model.remember(dataset)
    memory = model.base_model.memory()
    assert memory.inputs["input_ids"].shape == (3, 4)
    assert int(memory.inputs["attention_mask"].sum()) == 9


def test_dataloader_of_input_label_pairs_is_accepted(digits):
    loader = DataLoader(TensorDataset(digits["x_a_train"], digits["y_a_train"]), batch_size=16)
    model = mlp_model(anchor_budget=40)
    assert model.remember(loader)["total"] == 40


def test_budget_is_shared_evenly_across_tasks(digits):
    model = mlp_model(anchor_budget=30)
    model.remember(digits["x_a_train"])
    model.remember(digits["x_b_train"])
    summary = model.remember(digits["x_a_test"])
    assert summary["anchors_per_task"] == [10, 10, 10]


def test_explicit_num_anchors_leaves_the_rest_of_the_budget_to_older_tasks(digits):
    model = mlp_model(anchor_budget=30)
    model.remember(digits["x_a_train"])
    assert model.remember(digits["x_b_train"], num_anchors=20)["anchors_per_task"] == [10, 20]


def test_remember_records_new_references_for_old_anchors(digits):
    model = mlp_model(anchor_budget=20)
    model.remember(digits["x_a_train"])
    old_anchors = model.base_model.memory().inputs["_positional"][:10].clone()
    with torch.no_grad():
        model.base_model.model.fc1.fip_delta["default"].add_(0.5)
    model.remember(digits["x_b_train"])
    memory = model.base_model.memory()
    assert torch.equal(memory.inputs["_positional"][:10], old_anchors)
    with torch.no_grad():
        torch.testing.assert_close(memory.reference[:10], model.eval()(old_anchors))


def test_remember_is_reachable_on_the_fip_model_itself(digits):
    model = mlp_model(anchor_budget=8)
    assert model.base_model.remember(digits["x_a_train"])["total"] == 8


def test_num_anchors_above_the_budget_is_refused_and_changes_nothing(digits):
    model = mlp_model(anchor_budget=10)
    model.remember(digits["x_a_train"])
    with pytest.raises(ValueError, match="num_anchors.*anchor_budget"):
        model.remember(digits["x_b_train"], num_anchors=11)
    assert model.base_model.memory().anchors_per_task() == [10]


def test_empty_dataset_is_refused():
    model = bert_model()
    with pytest.raises(ValueError, match="empty"):
        model.remember(Dataset.from_dict({"input_ids": [], "attention_mask": []}))


def test_dataset_without_model_inputs_is_refused_naming_its_columns():
    model = bert_model()
    with pytest.raises(ValueError, match="text"):
        model.remember(Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}))


def test_inputs_the_model_cannot_take_are_refused_and_change_nothing(digits):
    model = mlp_model(anchor_budget=10)
    model.remember(digits["x_a_train"])
    before = model.base_model.memory().reference.clone()
    with pytest.raises(ValueError, match="cannot run on the anchors"):
        model.remember(torch.randn(5, 3))
    assert torch.equal(model.base_model.memory().reference, before)


def test_mixing_data_formats_across_calls_is_refused(digits):
    model = bert_model(anchor_budget=10)
    model.remember(as_tokens(digits["x_a_train"]))
    with pytest.raises(ValueError, match="same kind of data"):
        model.remember({"input_ids": as_tokens(digits["x_b_train"])["input_ids"]})


def test_non_integer_num_anchors_is_a_type_error(digits):
    with pytest.raises(TypeError, match="num_anchors"):
        mlp_model().remember(digits["x_a_train"], num_anchors=2.5)
