"""`anchor_transform` augments the anchors afresh at every FIP step; what it returns is checked."""

import pytest
import torch

import fip_peft
from tests._tasks import as_tokens, bert_model, mlp_model


def _step(model, **kwargs):
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.0, **kwargs)
    optimizer.add_anchor_gradient()
    return optimizer.pop_mean_distance()


def test_the_transform_gets_the_anchor_tensor_and_its_outputs_are_kept_at_the_anchors_references(digits):
    seen = []

    def transform(images):
        seen.append(images.clone())
        return images + 4.0

    model = mlp_model(anchor_budget=20, init_weights=False)
    model.remember(digits["x_a_train"])
    assert _step(model) == 0.0  # the references were recorded on these anchors
    assert _step(model, anchor_transform=transform) > 0.0  # augmented anchors move the outputs
    anchors = model.base_model.memory().inputs["_positional"]
    assert seen and all(any(torch.equal(row, a) for a in anchors) for row in seen[0])


def test_a_dict_model_s_transform_gets_and_returns_the_dict_of_inputs(digits):
    keys = []

    def transform(inputs):
        keys.append(sorted(inputs))
        return inputs

    model = bert_model(anchor_budget=8)
    model.remember(as_tokens(digits["x_a_train"][:8]))
    assert _step(model, anchor_transform=transform) == pytest.approx(0.0, abs=1e-10)
    assert keys == [["attention_mask", "input_ids"]]


@pytest.mark.parametrize(
    ("transform", "error", "match"),
    [
        (lambda x: x.tolist(), TypeError, "must return a tensor"),
        (lambda x: x[:3], ValueError, "must return a tensor with 16 rows"),
    ],
)
def test_a_transform_that_returns_something_else_is_named(digits, transform, error, match):
    model = mlp_model(anchor_budget=20)
    model.remember(digits["x_a_train"])
    with pytest.raises(error, match=f"`anchor_transform` {match}"):
        _step(model, anchor_transform=transform)


def test_an_anchor_transform_that_is_not_callable_is_refused_before_any_work(digits, tmp_path):
    from transformers import TrainingArguments

    model = mlp_model(anchor_budget=20)
    with pytest.raises(TypeError, match="`anchor_transform` must be a callable"):
        fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1, anchor_transform="flip")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    with pytest.raises(TypeError, match="`anchor_transform` must be a callable"):
        fip_peft.FIPTrainer(model=model, args=args, anchor_transform=3)
