"""Specification of the continual-learning measures, the accuracy matrix, per-task evaluation and the local metric.

Hub access is switched off by ``conftest.py`` before ``datasets`` is imported.
"""

import json
import math
import os

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from transformers.modeling_outputs import SequenceClassifierOutput

from fip_peft.apps.evaluation import (
    ACCURACY_METRIC_PATH,
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    evaluate_tasks,
    forgetting,
    load_accuracy_metric,
    plot_accuracy_matrix,
)

NAN = float("nan")
TWO_TASKS = [[0.9, NAN], [0.7, 0.8]]
# Task 0 peaks after task 1 (0.92) before dropping to 0.6, so forgetting (0.21) differs from -BWT (0.2).
THREE_TASKS = [[0.9, NAN, NAN], [0.92, 0.95, NAN], [0.6, 0.85, 0.7]]


# --- measures ------------------------------------------------------------------------------------------------------


def test_two_task_matrix_has_known_acc_bwt_and_forgetting():
    assert average_accuracy(TWO_TASKS) == pytest.approx(0.75)
    assert backward_transfer(TWO_TASKS) == pytest.approx(-0.2)
    assert forgetting(TWO_TASKS) == pytest.approx(0.2)


def test_three_task_matrix_has_hand_computed_acc():
    assert average_accuracy(THREE_TASKS) == pytest.approx((0.6 + 0.85 + 0.7) / 3)


def test_three_task_bwt_compares_final_with_just_learned_accuracy():
    assert backward_transfer(THREE_TASKS) == pytest.approx(((0.6 - 0.9) + (0.85 - 0.95)) / 2)


def test_three_task_forgetting_uses_the_best_earlier_accuracy():
    assert forgetting(THREE_TASKS) == pytest.approx(((0.92 - 0.6) + (0.95 - 0.85)) / 2)


def test_single_task_has_its_accuracy_as_acc_and_no_transfer_or_forgetting():
    assert average_accuracy([[0.8]]) == pytest.approx(0.8)
    assert backward_transfer([[0.8]]) == 0.0
    assert forgetting([[0.8]]) == 0.0


def test_improving_earlier_tasks_gives_positive_bwt_and_negative_forgetting():
    improving = [[0.5, NAN], [0.7, 0.9]]
    assert backward_transfer(improving) == pytest.approx(0.2)
    assert forgetting(improving) == pytest.approx(-0.2)


def test_entries_above_the_diagonal_are_ignored():
    filled = [[0.9, 0.1], [0.7, 0.8]]
    assert backward_transfer(filled) == backward_transfer(TWO_TASKS)
    assert forgetting(filled) == forgetting(TWO_TASKS)


def test_measures_accept_numpy_and_torch_matrices():
    for matrix in (np.array(THREE_TASKS), torch.tensor(THREE_TASKS)):
        assert average_accuracy(matrix) == pytest.approx(average_accuracy(THREE_TASKS))
        assert backward_transfer(matrix) == pytest.approx(backward_transfer(THREE_TASKS))
        assert forgetting(matrix) == pytest.approx(forgetting(THREE_TASKS))


@pytest.mark.parametrize(
    "matrix",
    [[], [[]], [[0.9, 0.8]], [[0.9], [0.8]], [0.9, 0.8], [[[0.9]]], [[0.9, NAN], [0.7]]],
    ids=["empty", "empty-row", "wide", "tall", "vector", "3d", "ragged"],
)
@pytest.mark.parametrize("measure", [average_accuracy, backward_transfer, forgetting])
def test_non_square_or_empty_matrix_raises_value_error_naming_the_argument(measure, matrix):
    with pytest.raises(ValueError, match="`R`"):
        measure(matrix)


def test_nan_on_or_below_the_diagonal_raises_value_error():
    with pytest.raises(ValueError, match="diagonal"):
        backward_transfer([[NAN, NAN], [0.7, 0.8]])


# --- AccuracyMatrix ------------------------------------------------------------------------------------------------


def _recorded_three_tasks() -> AccuracyMatrix:
    matrix = AccuracyMatrix(task_names=["a", "b", "c"])
    matrix.record(0, [0.9])
    matrix.record(1, [0.92, 0.95])
    matrix.record(2, [0.6, 0.85, 0.7])
    return matrix


def test_accuracy_matrix_measures_match_the_functions():
    matrix = _recorded_three_tasks()
    assert matrix.acc == pytest.approx(average_accuracy(THREE_TASKS))
    assert matrix.bwt == pytest.approx(backward_transfer(THREE_TASKS))
    assert matrix.forgetting == pytest.approx(forgetting(THREE_TASKS))


def test_accuracy_matrix_pads_missing_accuracies_with_nan():
    matrix = AccuracyMatrix(task_names=["a", "b", "c"])
    matrix.record(0, [0.9])
    assert matrix.matrix[0][0] == 0.9
    assert math.isnan(matrix.matrix[0][1]) and math.isnan(matrix.matrix[0][2])


def test_accuracy_matrix_measures_cover_only_the_tasks_trained_so_far():
    matrix = AccuracyMatrix(task_names=["a", "b", "c"])
    matrix.record(0, [0.9, 0.1, 0.2])
    matrix.record(1, [0.7, 0.8, 0.3])
    assert matrix.acc == pytest.approx(0.75)
    assert matrix.bwt == pytest.approx(-0.2)


def test_accuracy_matrix_measures_are_nan_before_any_record():
    matrix = AccuracyMatrix(task_names=["a"])
    assert math.isnan(matrix.acc) and math.isnan(matrix.bwt) and math.isnan(matrix.forgetting)


def test_recording_a_row_again_overwrites_it():
    matrix = AccuracyMatrix(task_names=["a", "b"])
    matrix.record(0, [0.5])
    matrix.record(0, [0.9])
    assert matrix.num_recorded == 1
    assert matrix.matrix[0][0] == 0.9


def test_recording_out_of_order_raises_value_error():
    matrix = AccuracyMatrix(task_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="after_task"):
        matrix.record(1, [0.9, 0.8])


def test_recording_fewer_accuracies_than_trained_tasks_raises_value_error():
    matrix = AccuracyMatrix(task_names=["a", "b"])
    matrix.record(0, [0.9])
    with pytest.raises(ValueError, match="accuracies"):
        matrix.record(1, [0.9])


def test_recording_more_accuracies_than_tasks_raises_value_error():
    matrix = AccuracyMatrix(task_names=["a"])
    with pytest.raises(ValueError, match="accuracies"):
        matrix.record(0, [0.9, 0.8])


def test_to_dict_holds_names_matrix_and_measures_with_nan_as_null():
    data = _recorded_three_tasks().to_dict()
    assert data["task_names"] == ["a", "b", "c"]
    assert data["matrix"][0] == [0.9, None, None]
    assert data["acc"] == pytest.approx(average_accuracy(THREE_TASKS))
    assert data["bwt"] == pytest.approx(backward_transfer(THREE_TASKS))
    assert data["forgetting"] == pytest.approx(forgetting(THREE_TASKS))


def test_to_json_writes_strict_json_that_round_trips(tmp_path):
    original = _recorded_three_tasks()
    path = original.to_json(tmp_path / "results" / "matrix.json")

    def reject_constant(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=reject_constant)
    restored = AccuracyMatrix.from_dict(data)
    assert restored.task_names == original.task_names
    np.testing.assert_array_equal(np.array(restored.matrix), np.array(original.matrix))
    assert restored.acc == pytest.approx(original.acc)


def test_str_shows_task_names_values_and_measures():
    text = str(_recorded_three_tasks())
    assert "after a" in text and "after c" in text
    assert "0.9500" in text
    assert "ACC=0.7167" in text and "BWT=-0.2000" in text and "forgetting=0.2100" in text


# --- plot ----------------------------------------------------------------------------------------------------------


def test_plot_accuracy_matrix_writes_a_png(tmp_path):
    path = plot_accuracy_matrix(THREE_TASKS, tmp_path / "plots" / "matrix.png", task_names=["a", "b", "c"], title="x")
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_accuracy_matrix_rejects_wrong_number_of_task_names(tmp_path):
    with pytest.raises(ValueError, match="task_names"):
        plot_accuracy_matrix(THREE_TASKS, tmp_path / "matrix.png", task_names=["a"])


# --- local metric --------------------------------------------------------------------------------------------------


def test_local_accuracy_metric_loads_offline_and_computes_accuracy():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    metric = load_accuracy_metric()
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 0])["accuracy"] == pytest.approx(0.5)


def test_local_accuracy_metric_is_shipped_as_a_script_in_the_package():
    assert (ACCURACY_METRIC_PATH / "accuracy.py").is_file()


# --- evaluate_tasks ------------------------------------------------------------------------------------------------


def _argmax_linear() -> nn.Linear:
    """A 2-class linear model whose prediction is the index of the larger input feature."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    return model


# Predictions are [0, 1, 0, 1, 0]: task A gets 3 of 5 right, task B all 5.
INPUTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
LABELS_A = torch.tensor([0, 1, 1, 1, 1])
LABELS_B = torch.tensor([0, 1, 0, 1, 0])


class DictDataset(Dataset):
    """A torch dataset of ``{"inputs": x, "labels": y}`` examples."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[index], "labels": self.labels[index]}


class KeywordClassifier(nn.Module):
    """Takes its input by keyword and returns a transformers output with ``.logits``, like HF models."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = _argmax_linear()

    def forward(self, inputs: torch.Tensor) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.linear(inputs))


class TupleOutputClassifier(nn.Module):
    """Returns ``(logits, hidden)``, so predictions must come from the first element."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = _argmax_linear()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), -self.linear(x)


def test_evaluate_tasks_scores_tuple_datasets_exactly():
    tasks = [TensorDataset(INPUTS, LABELS_A), TensorDataset(INPUTS, LABELS_B)]
    accuracies = evaluate_tasks(_argmax_linear(), tasks, batch_size=2, progress=False)
    assert accuracies == pytest.approx([0.6, 1.0])


def test_evaluate_tasks_passes_dict_batches_as_keywords_and_reads_logits():
    tasks = [DictDataset(INPUTS, LABELS_A), DictDataset(INPUTS, LABELS_B)]
    assert evaluate_tasks(KeywordClassifier(), tasks, batch_size=3, progress=False) == pytest.approx([0.6, 1.0])


def test_evaluate_tasks_uses_the_given_label_key():
    dataset = [{"inputs": x, "target": y} for x, y in zip(INPUTS, LABELS_A, strict=True)]
    accuracies = evaluate_tasks(KeywordClassifier(), [dataset], label_key="target", progress=False)
    assert accuracies == pytest.approx([0.6])


def test_evaluate_tasks_takes_predictions_from_the_first_element_of_tuple_outputs():
    tasks = [TensorDataset(INPUTS, LABELS_A)]
    assert evaluate_tasks(TupleOutputClassifier(), tasks, progress=False) == pytest.approx([0.6])


def test_evaluate_tasks_formats_hf_datasets_with_the_model_input_columns_and_label():
    hf_dataset = datasets.Dataset.from_dict(
        {"inputs": INPUTS.tolist(), "label": LABELS_A.tolist(), "text": ["unused"] * len(LABELS_A)}
    )
    assert evaluate_tasks(KeywordClassifier(), [hf_dataset], batch_size=4, progress=False) == pytest.approx([0.6])


def test_evaluate_tasks_uses_a_custom_collate_fn():
    def collate(examples):
        return {"inputs": torch.stack([x for x, _ in examples]), "labels": torch.stack([y for _, y in examples])}

    tasks = [TensorDataset(INPUTS, LABELS_B)]
    assert evaluate_tasks(KeywordClassifier(), tasks, collate_fn=collate, progress=False) == pytest.approx([1.0])


def test_evaluate_tasks_runs_in_eval_mode_without_gradients():
    seen = {}

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = _argmax_linear()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["training"], seen["grad"] = self.training, torch.is_grad_enabled()
            return self.linear(x)

    evaluate_tasks(Probe().train(), [TensorDataset(INPUTS, LABELS_A)], progress=False)
    assert seen == {"training": False, "grad": False}


def test_evaluate_tasks_restores_train_mode():
    model = _argmax_linear().train()
    evaluate_tasks(model, [TensorDataset(INPUTS, LABELS_A)], progress=False)
    assert model.training


def test_evaluate_tasks_keeps_eval_mode():
    model = _argmax_linear().eval()
    evaluate_tasks(model, [TensorDataset(INPUTS, LABELS_A)], progress=False)
    assert not model.training


def test_evaluate_tasks_restores_train_mode_when_the_model_fails():
    model = TupleOutputClassifier().train()
    with pytest.raises(KeyError, match="missing"):
        evaluate_tasks(model, [DictDataset(INPUTS, LABELS_A)], label_key="missing", progress=False)
    assert model.training
