"""`FIPConfig.anchor_output_module`: FIP keeps a named submodule's output (hidden features) on the anchors."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import fip_peft
from fip_peft.method.layer import FIPLayer
from tests._tasks import MLP, as_tokens, bert_model, tiny_bert, train_plain


def pooler_output(model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    bert = model.get_base_model().bert
    with torch.no_grad():
        return bert.eval()(**tokens).pooler_output


def fc2_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    caught = []
    hook = model.get_base_model().fc2.register_forward_hook(lambda m, a, out: caught.append(out))
    with torch.no_grad():
        model.eval()(x)
    hook.remove()
    return caught[0]


def test_reference_is_the_named_modules_output_on_the_anchors(digits):
    model = bert_model(anchor_budget=16, init_weights=False, anchor_output_module="bert.pooler")
    model.remember(as_tokens(digits["x_a_train"][:40]))
    memory = model.base_model.memory()
    assert memory.reference.shape == (16, 32)
    torch.testing.assert_close(memory.reference, pooler_output(model, memory.inputs))


def test_changes_after_the_named_module_do_not_move_the_anchor_distance(digits):
    model = bert_model(anchor_budget=16, anchor_output_module="bert.pooler")
    model.remember(as_tokens(digits["x_a_train"][:40]))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save.default.weight.add_(1.0)
    assert float(model.base_model.anchor_distance().detach()) == 0.0


def test_changes_before_the_named_module_move_the_anchor_distance(digits):
    model = bert_model(anchor_budget=16, anchor_output_module="bert.pooler")
    model.remember(as_tokens(digits["x_a_train"][:40]))
    layer = model.base_model.model.bert.encoder.layer[0].attention.output.dense
    with torch.no_grad():
        layer.fip_delta["default"].add_(0.1)
    assert float(model.base_model.anchor_distance().detach()) > 0.0


def test_unknown_module_is_refused_naming_the_closest_before_any_layer_is_replaced():
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"anchor_output_module='bert\.poolr'.*'bert\.pooler'"):
        get_peft_model(base, fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_output_module="bert.poolr"))
    assert not any(isinstance(module, FIPLayer) for module in base.modules())


@pytest.mark.parametrize("distance", ["bhattacharyya", "kl"])
def test_softmax_distances_are_refused_on_hidden_features(distance):
    with pytest.raises(ValueError, match="FIPConfig.anchor_output_module.*distance='logits'"):
        fip_peft.FIPConfig(anchor_output_module="bert.pooler", distance=distance)


@pytest.mark.parametrize(("value", "error"), [("", ValueError), (3, TypeError)])
def test_a_module_name_that_is_not_a_name_is_refused(value, error):
    with pytest.raises(error, match="FIPConfig.anchor_output_module"):
        fip_peft.FIPConfig(anchor_output_module=value)


def test_a_module_outside_the_forward_pass_is_refused_by_remember(digits):
    base = MLP()
    base.unused = nn.Linear(64, 8)
    model = get_peft_model(base, fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_output_module="unused"))
    with pytest.raises(ValueError, match="anchor_output_module='unused' did not run"):
        model.remember(digits["x_a_train"][:20])
    assert len(model.base_model.memory()) == 0


def test_saved_adapter_keeps_the_named_module_and_its_reference(digits, tmp_path):
    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_bert(),
        fip_peft.FIPConfig(
            task_type="SEQ_CLS", anchor_budget=16, init_weights=False, anchor_output_module="bert.pooler"
        ),
    )
    model.remember(as_tokens(digits["x_a_train"][:40]))
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        type(tiny_bert()).from_pretrained(tmp_path / "base"), tmp_path / "adapter", is_trainable=True
    )
    assert loaded.peft_config["default"].anchor_output_module == "bert.pooler"
    assert float(loaded.base_model.anchor_distance().detach()) == pytest.approx(0.0, abs=1e-10)


def test_natural_step_keeps_the_named_modules_output_10x_better_than_a_plain_step(digits):
    torch.manual_seed(0)
    trained = train_plain(MLP(), digits["x_a_train"], digits["y_a_train"], 40, 3e-3)
    anchors = digits["x_a_train"]
    model = get_peft_model(
        copy.deepcopy(trained),
        fip_peft.FIPConfig(target_modules=["fc1", "fc2"], solver="natural", epsilon=1e-3, anchor_output_module="fc2"),
    )
    model.remember(anchors)
    plain = copy.deepcopy(model)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=1.0)
    params = [p for p in plain.parameters() if p.requires_grad]
    for m in (model, plain):
        m.train()
        nn.functional.cross_entropy(m(digits["x_b_train"][:64]), digits["y_b_train"][:64]).backward()
    grad_norm = float(torch.cat([p.grad.flatten() for p in params]).norm())
    before = fc2_output(model, anchors)
    optimizer.step()
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-1e-3 / grad_norm)
    natural_change = (fc2_output(model, anchors) - before).pow(2).sum(-1).mean()
    plain_change = (fc2_output(plain, anchors) - before).pow(2).sum(-1).mean()
    assert natural_change * 10 <= plain_change


def test_sparsify_walk_on_hidden_features_ends_at_the_target_sparsity(digits):
    tokens = as_tokens(digits["x_a_train"][:64])
    model = get_peft_model(
        tiny_bert(),
        fip_peft.FIPConfig(
            target_modules=["query", "value", "dense"],
            exclude_modules=["pooler.dense"],
            objective="sparsify",
            target_sparsity=0.5,
            sparsity_ramp_steps=4,
            anchor_output_module="bert.pooler",
        ),
    )
    model.remember(tokens)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        optimizer.step()
    assert model.sparsity_report()["sparsity"] == pytest.approx(0.5, abs=1e-3)
