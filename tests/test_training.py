"""The FIP step: what `create_fip_optimizer`, `FIPTrainer` and plain `Trainer` do during training."""

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments

import fip_peft
from tests._tasks import MLP, as_tokens, logits_of, run_steps, tiny_bert


def mlp_model(**config):
    return get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2", "head"], **config))


def token_dataset(x, y) -> Dataset:
    tokens = as_tokens(x)
    return Dataset.from_dict({**{k: v.tolist() for k, v in tokens.items()}, "labels": y.tolist()})


def trainer_args(tmp_path, steps=4) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )


def bert_with_anchors(digits, **config):
    model = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=32, **config))
    model.remember(as_tokens(digits["x_a_train"]))
    return model


def expected_fip_gradient(model, digits, beta: float) -> list[torch.Tensor]:
    """grad(L_task + D / beta) on the anchor batch the optimizer's first step will draw."""
    params = [p for p in model.parameters() if p.requires_grad]
    memory = model.base_model.memory()
    index = memory.next_batch_index(8, seed=0)
    memory.sample_step.zero_()
    inputs, reference = memory.batch(index)
    model.eval()
    task = nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16])
    distance = (model(inputs["_positional"]) - reference).pow(2).sum(-1).mean() / memory.scale
    return list(torch.autograd.grad(task + distance / beta, params))


def take_one_sgd_step(model, digits, **optimizer_kwargs) -> list[torch.Tensor]:
    """The parameter change of one FIP SGD step on task B (lr 0.1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1, **optimizer_kwargs)
    nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16]).backward()
    optimizer.step()
    return [p0 - p.detach() for p, p0 in zip(params, before, strict=True)]


def test_step_adds_the_anchor_gradient_over_beta_to_the_task_gradient(digits):
    model = mlp_model(beta=0.5, anchor_batch_size=8, init_weights=False)
    model.remember(digits["x_a_train"][:40])
    expected = expected_fip_gradient(model, digits, beta=0.5)
    for change, g in zip(take_one_sgd_step(model, digits), expected, strict=True):
        torch.testing.assert_close(change, 0.1 * g, atol=1e-6, rtol=1e-4)


def test_max_grad_norm_clips_the_combined_task_and_anchor_gradient(digits):
    model = mlp_model(beta=0.5, anchor_batch_size=8, init_weights=False)
    model.remember(digits["x_a_train"][:40])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fip_delta" in name:
                p.add_(0.05 * torch.randn_like(p))
    expected = expected_fip_gradient(model, digits, beta=0.5)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
    max_norm = float(total) / 4
    changes = take_one_sgd_step(model, digits, max_grad_norm=max_norm)
    for change, g in zip(changes, expected, strict=True):
        torch.testing.assert_close(change, 0.1 * g * max_norm / total, atol=1e-6, rtol=1e-3)


def test_create_fip_optimizer_rejects_a_non_positive_max_grad_norm():
    model = mlp_model()
    with pytest.raises(ValueError, match="max_grad_norm"):
        fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1, max_grad_norm=0)


def test_without_anchors_the_step_is_the_plain_optimizer_step(digits):
    torch.manual_seed(0)
    fip = mlp_model(init_weights=False)
    plain = mlp_model(init_weights=False)
    plain.load_state_dict(fip.state_dict())
    run_steps(
        fip,
        fip_peft.create_fip_optimizer(fip, torch.optim.AdamW, lr=1e-2),
        digits["x_b_train"],
        digits["y_b_train"],
        5,
    )
    run_steps(
        plain,
        torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2),
        digits["x_b_train"],
        digits["y_b_train"],
        5,
    )
    for (name, a), b in zip(fip.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("solver", ["penalty", "natural+penalty"])
def test_step_leaves_a_submodule_the_user_put_in_eval_mode_in_eval_mode(digits, solver):
    model = mlp_model(solver=solver)
    model.remember(digits["x_a_train"][:40])
    model.train()
    fc2 = model.base_model.model.fc2
    fc2.eval()
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16]).backward()
    optimizer.step()
    assert not fc2.training
    assert model.training and model.base_model.model.fc1.training


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.drop(x))


class RecordsTrainCalls(DropoutMLP):
    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def train(self, mode: bool = True):
        self.modes.append(mode)
        return super().train(mode)


def test_anchor_distance_is_measured_with_dropout_off(digits):
    model = get_peft_model(DropoutMLP(), fip_peft.FIPConfig(target_modules=["fc"]))
    model.remember(digits["x_a_train"][:40])
    model.train()
    assert float(model.base_model.anchor_distance()) == 0.0
    assert model.base_model.model.drop.training


def test_anchor_pass_calls_a_module_s_own_train_method(digits):
    model = get_peft_model(RecordsTrainCalls(), fip_peft.FIPConfig(target_modules=["fc"]))
    model.remember(digits["x_a_train"][:40])
    model.train()
    inner = model.base_model.model
    inner.modes.clear()
    model.base_model.anchor_distance()
    assert inner.modes == [False]
    assert inner.training and inner.drop.training


def test_training_changes_only_adapter_parameters(digits):
    model = mlp_model()
    model.remember(digits["x_a_train"])
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    run_steps(
        model,
        fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-2),
        digits["x_b_train"],
        digits["y_b_train"],
        5,
    )
    for name, p in model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name
        else:
            assert "fip_delta" in name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "fip_delta" in n)


def test_plain_optimizer_on_a_model_with_anchors_raises_instead_of_fine_tuning_silently(digits):
    model = mlp_model()
    model.remember(digits["x_a_train"])
    model.train()
    with pytest.raises(RuntimeError, match="create_fip_optimizer"):
        model(digits["x_b_train"][:4])


def test_plain_trainer_with_its_default_optimizer_raises_a_clear_error(digits, tmp_path):
    model = bert_with_anchors(digits)
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path), train_dataset=token_dataset(digits["x_b_train"], digits["y_b_train"])
    )
    with pytest.raises(RuntimeError, match="FIPTrainer"):
        trainer.train()


def test_plain_trainer_with_the_fip_optimizer_performs_the_fip_step(digits, tmp_path):
    model = bert_with_anchors(digits)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path),
        optimizers=(optimizer, None),
        train_dataset=token_dataset(digits["x_b_train"], digits["y_b_train"]),
    )
    trainer.train()
    assert int(model.base_model.memory().sample_step) == 4


def test_fip_trainer_performs_the_fip_step_and_logs_the_distance(digits, tmp_path):
    model = bert_with_anchors(digits)
    trainer = fip_peft.FIPTrainer(
        model=model, args=trainer_args(tmp_path), train_dataset=token_dataset(digits["x_b_train"], digits["y_b_train"])
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, fip_peft.optimizers.FIPStepMixin)
    assert int(model.base_model.memory().sample_step) == 4
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("fip_distance" in entry and entry["fip_distance"] >= 0 for entry in logged)


def test_fip_trainer_clips_the_combined_gradient_not_the_task_gradient_alone(digits, tmp_path):
    model = bert_with_anchors(digits, init_weights=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fip_delta" in name:
                p.add_(0.05 * torch.randn_like(p))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    args = trainer_args(tmp_path, steps=1)
    args.optim, args.learning_rate, args.max_grad_norm = "sgd", 1.0, 1e-3
    trainer = fip_peft.FIPTrainer(
        model=model, args=args, train_dataset=token_dataset(digits["x_b_train"], digits["y_b_train"])
    )
    trainer.train()
    assert trainer.optimizer.optimizer.fip_max_grad_norm == 1e-3
    change = torch.linalg.vector_norm(
        torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(params, before, strict=True)])
    )
    assert 0 < float(change) <= 1e-3 * (1 + 1e-4)


def test_fip_trainer_refuses_a_model_without_an_fip_adapter(tmp_path):
    with pytest.raises(TypeError, match="get_peft_model"):
        fip_peft.FIPTrainer(model=tiny_bert(), args=trainer_args(tmp_path))


def test_create_fip_optimizer_refuses_a_model_without_an_fip_adapter():
    with pytest.raises(TypeError, match="FIP adapter"):
        fip_peft.create_fip_optimizer(MLP(), torch.optim.AdamW, lr=1e-3)


def test_create_fip_optimizer_refuses_a_non_optimizer_class():
    with pytest.raises(TypeError, match="optimizer_cls"):
        fip_peft.create_fip_optimizer(mlp_model(), nn.Linear, lr=1e-3)


def test_fip_optimizer_state_dict_loads_into_a_plain_optimizer_of_the_same_class(digits):
    model = mlp_model()
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    run_steps(model, optimizer, digits["x_b_train"], digits["y_b_train"], 2)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    plain.load_state_dict(optimizer.state_dict())
    assert isinstance(optimizer, torch.optim.AdamW)


def test_logits_of_the_model_under_training_stay_finite(digits):
    model = bert_with_anchors(digits)
    run_steps(
        model,
        fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3),
        as_tokens(digits["x_b_train"]),
        digits["y_b_train"],
        3,
    )
    assert torch.isfinite(logits_of(model.eval(), as_tokens(digits["x_a_test"][:8]))).all()
