"""Labels travel with anchors: `remember` stores them, the FIP step adds their cross-entropy with weight
`label_weight`, the adapter saves and reloads them, and bad labels are refused before anything changes."""

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

import fip_peft
from tests._tasks import MLP, accuracy, as_tokens, bert_model, mlp_model, run_steps


def _labelled_mlp(digits, **config):
    model = mlp_model(anchor_budget=40, modules_to_save=["head"], **config)
    model.remember(digits["x_a_train"], labels=digits["y_a_train"])
    return model


def test_labels_given_to_remember_are_stored_with_their_anchors(digits):
    model = mlp_model(anchor_budget=40)
    summary = model.remember(digits["x_a_train"], labels=digits["y_a_train"])
    memory = model.base_model.memory()
    assert summary["labelled"] == 40
    # each stored anchor carries the label of the example it came from
    x, y = digits["x_a_train"], digits["y_a_train"]
    for anchor, label in zip(memory.inputs["_positional"], memory.labels, strict=True):
        rows = (x == anchor).all(dim=1).nonzero().flatten()
        assert int(label) in y[rows].tolist()


@pytest.mark.parametrize("source", ["dataset", "dataloader", "dict"])
def test_labels_are_read_from_the_data_s_own_label_field(digits, source):
    tokens = as_tokens(digits["x_a_train"][:30])
    labels = digits["y_a_train"][:30]
    if source == "dataset":
        data = Dataset.from_dict({**{k: v.tolist() for k, v in tokens.items()}, "label": labels.tolist()})
    elif source == "dict":
        data = {**tokens, "labels": labels}
    else:
        rows = [{k: v[i] for k, v in tokens.items()} | {"labels": labels[i]} for i in range(30)]
        data = DataLoader(rows, batch_size=8)
    model = bert_model(anchor_budget=30)
    model.remember(data)
    memory = model.base_model.memory()
    order = [
        next(i for i in range(30) if torch.equal(tokens["input_ids"][i], row)) for row in memory.inputs["input_ids"]
    ]
    assert memory.labels.tolist() == labels[order].tolist()


def test_input_label_pairs_from_a_dataloader_bring_their_labels(digits):
    loader = DataLoader(TensorDataset(digits["x_a_train"], digits["y_a_train"]), batch_size=16)
    model = mlp_model(anchor_budget=20)
    assert model.remember(loader)["labelled"] == 20


def test_anchors_without_labels_are_marked_unlabelled_beside_labelled_ones(digits):
    model = mlp_model(anchor_budget=40)
    model.remember(digits["x_a_train"])
    model.remember(digits["x_b_train"], labels=digits["y_b_train"])
    memory = model.base_model.memory()
    assert (memory.labels[memory.task_ids == 0] == -100).all()
    assert (memory.labels[memory.task_ids == 1] >= 5).all()


def test_the_fip_step_adds_label_weight_times_the_anchor_cross_entropy(digits):
    torch.manual_seed(0)
    model = _labelled_mlp(digits, label_weight=0.7, anchor_batch_size=8, init_weights=False)
    memory = model.base_model.memory()
    index = memory.batch_index(8, 0, int(memory.sample_step))
    params = [p for p in model.parameters() if p.requires_grad]
    # expected: grad of D / beta + 0.7 * CE on the same anchor batch, no task loss
    model.eval()
    outputs = model(memory.inputs["_positional"][index])
    distance = (outputs - memory.reference[index]).pow(2).sum(-1).mean() / memory.scale
    config = model.peft_config["default"]
    objective = distance / config.beta + 0.7 * torch.nn.functional.cross_entropy(outputs, memory.labels[index])
    expected = torch.autograd.grad(objective, params)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.0)
    optimizer.add_anchor_gradient()
    for param, want in zip(params, expected, strict=True):
        torch.testing.assert_close(param.grad, want)


def test_label_weight_zero_is_the_output_term_alone(digits):
    grads = []
    for labels, weight in ((True, 0.0), (False, 1.0)):
        torch.manual_seed(0)
        model = mlp_model(anchor_budget=40, modules_to_save=["head"], label_weight=weight, init_weights=False)
        model.remember(digits["x_a_train"], labels=digits["y_a_train"] if labels else None)
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.0)
        optimizer.add_anchor_gradient()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for with_labels, without in zip(*grads, strict=True):
        torch.testing.assert_close(with_labels, without)


def test_labelled_anchors_keep_an_old_task_better_in_class_incremental_learning(digits):
    kept = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = mlp_model(anchor_budget=100, modules_to_save=["head"], label_weight=weight)
        plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        run_steps(model, plain, digits["x_a_train"], digits["y_a_train"], 150)
        model.remember(digits["x_a_train"], labels=digits["y_a_train"])
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
        run_steps(model, optimizer, digits["x_b_train"], digits["y_b_train"], 150)
        kept[weight] = accuracy(model, digits["x_a_test"], digits["y_a_test"])
        assert accuracy(model, digits["x_b_test"], digits["y_b_test"]) > 0.5
    assert kept[1.0] > kept[0.0] + 0.03


def test_labels_are_saved_and_reloaded_with_the_adapter(digits, tmp_path):
    model = _labelled_mlp(digits)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=True)
    assert torch.equal(loaded.base_model.memory().labels, model.base_model.memory().labels)


def test_an_adapter_saved_before_labels_loads_with_unlabelled_anchors(digits, tmp_path):
    model = _labelled_mlp(digits)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith("fip_memory.labels")}
    save_file(tensors, path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=True)
    memory = loaded.base_model.memory()
    assert len(memory) == 40 and not memory.has_labels


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (torch.full((100,), 10), ValueError, r"class indices in \[0, 10\)"),
        (torch.zeros(7, dtype=torch.long), ValueError, "one label per example of `data` \\(100\\)"),
        (torch.zeros(100), TypeError, "integer class indices"),
        (torch.zeros(100, 3, dtype=torch.long), ValueError, "one class index per example"),
    ],
)
def test_labels_that_do_not_fit_are_refused_before_anything_is_stored(digits, labels, error, match):
    model = mlp_model(anchor_budget=40)
    with pytest.raises(error, match=match):
        model.remember(digits["x_a_train"][:100], labels=labels)
    assert len(model.base_model.memory()) == 0 and model.peft_config["default"].task_names == []


def test_labels_with_a_hidden_anchor_output_are_refused(digits):
    model = bert_model(anchor_budget=8, anchor_output_module="bert.pooler")
    tokens = as_tokens(digits["x_a_train"][:8])
    with pytest.raises(ValueError, match="anchor_output_module='bert.pooler'"):
        model.remember(tokens, labels=digits["y_a_train"][:8])
    model.remember({**tokens, "labels": digits["y_a_train"][:8]})  # the data's own labels are left out
    assert not model.base_model.memory().has_labels


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_label_weight_must_be_finite_and_not_negative(value):
    with pytest.raises(ValueError, match="FIPConfig.label_weight must be a finite number >= 0"):
        fip_peft.FIPConfig(target_modules=["fc1"], label_weight=value)


def test_label_weight_defaults_to_the_label_term_for_continual_learning_and_off_for_sparsifying():
    assert fip_peft.FIPConfig(target_modules=["fc1"]).label_weight == fip_peft.method.config.DEFAULT_LABEL_WEIGHT > 0
    sparsify = fip_peft.FIPConfig(target_modules=["fc1"], objective="sparsify", target_sparsity=0.5)
    assert sparsify.label_weight == 0.0


def test_saved_labels_outside_the_classes_are_refused_at_load(digits, tmp_path):
    model = _labelled_mlp(digits)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("fip_memory.labels"))
    tensors[key] = torch.full_like(tensors[key], 12)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"labels that are not class indices in \[0, 10\)"):
        PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=True)


def test_the_card_s_privacy_note_says_that_labels_are_stored_too(digits):
    from fip_peft.integrations.model_card import fip_card_section

    model = _labelled_mlp(digits)
    assert "and the labels of 40 of them" in fip_card_section(model)
