"""`FIPConfig.anchor_interval`: the anchor pass every k optimizer steps (issue 28)."""

import copy
import io

import pytest
import torch
from peft import get_peft_model

import fip_peft
from fip_peft.optimizers.fip import ANCHOR_INTERVAL_STATE
from tests._tasks import MLP, mlp_model, tiny_bert
from tests.test_reliability_round2 import LossMLP, mlp_dataset, trainer_args


def moved_mlp(digits, **config):
    """The MLP with the digits of task A remembered and its displacement then moved off the reference, so that D and
    its gradient are not zero."""
    torch.manual_seed(0)
    model = mlp_model(anchor_budget=32, anchor_batch_size=4, **config)
    model.remember(digits["x_a_train"][:64])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fip_delta" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def adapter_grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def task_step(model, optimizer, digits, step):
    rows = slice(8 * step, 8 * step + 8)
    loss = torch.nn.functional.cross_entropy(model(digits["x_b_train"][rows]), digits["y_b_train"][rows])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def count_passes(model, monkeypatch):
    calls = []
    fip_model = model.base_model
    original = fip_model.anchor_terms

    def spy(*args, **kwargs):
        calls.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(fip_model, "anchor_terms", spy)
    return calls


@pytest.mark.parametrize("mode", ["reuse", "scale"])
def test_the_anchor_pass_runs_exactly_every_k_steps(digits, monkeypatch, mode):
    model = moved_mlp(digits, anchor_interval=3, anchor_interval_mode=mode)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    calls = count_passes(model, monkeypatch)
    passed_at = []
    for step in range(7):
        before = len(calls)
        task_step(model, optimizer, digits, step)
        if len(calls) > before:
            passed_at.append(step)
    assert passed_at == [0, 3, 6]
    assert int(model.base_model.memory().sample_step) == 3  # one anchor batch drawn per pass
    assert optimizer.fip_steps == 7 and optimizer.fip_anchor_step == 7


def test_reuse_adds_the_last_pass_gradient_at_every_step_until_the_next_pass(digits):
    every = moved_mlp(digits)
    lazy = moved_mlp(digits, anchor_interval=3)
    reference = fip_peft.create_fip_optimizer(every, torch.optim.SGD, lr=0.0)
    optimizer = fip_peft.create_fip_optimizer(lazy, torch.optim.SGD, lr=0.0)
    reference.step()  # no task gradient: .grad holds the anchor gradient of the first batch alone
    expected = adapter_grads(every)
    assert any(g is not None and g.abs().sum() > 0 for g in expected.values())
    for _ in range(3):  # the pass, then two steps re-adding its gradient
        optimizer.zero_grad()
        optimizer.step()
        for name, grad in adapter_grads(lazy).items():
            if expected[name] is None:
                assert grad is None, name
            else:
                torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=name)
    assert int(lazy.base_model.memory().sample_step) == 1


def test_scale_multiplies_the_pass_gradient_by_k_and_adds_nothing_between(digits):
    every = moved_mlp(digits)
    lazy = moved_mlp(digits, anchor_interval=4, anchor_interval_mode="scale")
    reference = fip_peft.create_fip_optimizer(every, torch.optim.SGD, lr=0.0)
    optimizer = fip_peft.create_fip_optimizer(lazy, torch.optim.SGD, lr=0.0)
    reference.step()
    expected = adapter_grads(every)
    optimizer.step()
    for name, grad in adapter_grads(lazy).items():
        if expected[name] is not None:
            torch.testing.assert_close(grad, 4 * expected[name], rtol=1e-6, atol=1e-9, msg=name)
    optimizer.zero_grad()
    optimizer.step()
    assert all(g is None for g in adapter_grads(lazy).values())


def test_the_task_gradient_and_the_kept_anchor_gradient_add_up(digits):
    """At a step between passes the gradient is the task's plus the kept one, as at k=1 (plus the fresh one)."""
    model = moved_mlp(digits, anchor_interval=2)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.0)
    optimizer.step()
    kept = adapter_grads(model)
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(digits["x_b_train"][:8]), digits["y_b_train"][:8])
    loss.backward()
    task = adapter_grads(model)
    optimizer.step()
    for name, grad in adapter_grads(model).items():
        parts = [g for g in (task[name], kept[name]) if g is not None]
        if parts:
            torch.testing.assert_close(grad, sum(parts), msg=name)


def nan_step(model, optimizer, digits):
    loss = torch.nn.functional.cross_entropy(model(digits["x_b_train"][:8]), digits["y_b_train"][:8])
    (loss * float("nan")).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("mode", ["reuse", "scale"])
@pytest.mark.parametrize("bad_step", [0, 1])  # at a pass, between passes
def test_a_skipped_nonfinite_step_changes_nothing_with_k_above_one(digits, monkeypatch, mode, bad_step):
    model = moved_mlp(digits, anchor_interval=2, anchor_interval_mode=mode)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    expected_model = copy.deepcopy(model)
    expected_optimizer = fip_peft.create_fip_optimizer(expected_model, torch.optim.AdamW, lr=1e-3)
    for step in range(bad_step):
        task_step(model, optimizer, digits, step)
        task_step(expected_model, expected_optimizer, digits, step)
    calls = count_passes(model, monkeypatch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    counter, sample_step = optimizer.fip_anchor_step, int(model.base_model.memory().sample_step)
    nan_step(model, optimizer, digits)
    assert optimizer.fip_step_was_skipped
    assert optimizer.fip_anchor_step == counter and int(model.base_model.memory().sample_step) == sample_step
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert len(calls) == (1 if bad_step == 0 else 0)
    for step in range(bad_step, 4):  # the run goes on as if the bad step had not happened
        task_step(model, optimizer, digits, step)
        task_step(expected_model, expected_optimizer, digits, step)
    for (name, p), (_, q) in zip(model.named_parameters(), expected_model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_a_step_between_passes_is_still_a_fip_step(digits):
    """The guard against silent plain fine-tuning sees a FIP optimizer whether or not the step ran the pass; a plain
    optimizer is still refused."""
    model = moved_mlp(digits, anchor_interval=3)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    for step in range(3):
        task_step(model, optimizer, digits, step)
    assert optimizer.fip_steps == 3
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(digits["x_b_train"][:8]).sum().backward()
    with pytest.raises(RuntimeError, match="not a FIP optimizer"):
        plain.step()


@pytest.mark.parametrize("mode", ["reuse", "scale"])
def test_resuming_a_loop_from_its_state_dicts_keeps_the_pass_schedule(digits, mode):
    config = {"anchor_interval": 3, "anchor_interval_mode": mode}
    model = moved_mlp(digits, **config)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    for step in range(4):
        task_step(model, optimizer, digits, step)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    assert optimizer.state_dict()[ANCHOR_INTERVAL_STATE]["step"] == 4
    for step in range(4, 8):
        task_step(model, optimizer, digits, step)

    resumed = moved_mlp(digits, **config)
    resumed_optimizer = fip_peft.create_fip_optimizer(resumed, torch.optim.AdamW, lr=1e-3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert resumed_optimizer.fip_anchor_step == 4
    assert (resumed_optimizer._fip_anchor_cache is not None) == (mode == "reuse")
    for step in range(4, 8):
        task_step(resumed, resumed_optimizer, digits, step)
    for (name, p), (_, q) in zip(resumed.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)


def test_fip_trainer_resumed_with_k_above_one_lands_where_the_uninterrupted_run_does(digits, tmp_path):
    def trainer(out, remember=True, **settings):
        torch.manual_seed(0)
        model = get_peft_model(
            LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16, anchor_interval=3)
        )
        if remember:
            model.remember(digits["x_a_train"])
        args = trainer_args(out, steps=7, **settings)
        return fip_peft.FIPTrainer(model=model, args=args, train_dataset=mlp_dataset(digits))

    uninterrupted = trainer(tmp_path, save_strategy="steps", save_steps=4)
    uninterrupted.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed._fip_optimizer.fip_anchor_step == uninterrupted._fip_optimizer.fip_anchor_step == 7
    memory, expected_memory = resumed.model.base_model.memory(), uninterrupted.model.base_model.memory()
    assert int(memory.sample_step) == int(expected_memory.sample_step) == 3
    for (name, p), (_, q) in zip(
        resumed.model.named_parameters(), uninterrupted.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_remembering_new_anchors_drops_the_kept_gradient(digits, monkeypatch):
    model = moved_mlp(digits, anchor_interval=4)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    task_step(model, optimizer, digits, 0)
    model.remember(digits["x_b_train"][:16])
    calls = count_passes(model, monkeypatch)
    task_step(model, optimizer, digits, 1)
    assert len(calls) == 1  # the kept gradient was of the old anchors and references


@pytest.mark.parametrize(
    "settings",
    [
        {"solver": "natural+penalty", "metric_update_interval": 2},
        {"objective": "sparsify", "target_sparsity": 0.5, "sparsity_ramp_steps": 2, "sparsity_update_every": 1},
    ],
    ids=["natural+penalty", "sparsify"],
)
def test_k_above_one_runs_with_the_other_step_parts(digits, monkeypatch, settings):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_interval=2, **settings))
    model.remember(digits["x_a_train"][:64])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    calls = count_passes(model, monkeypatch)
    for step in range(4):
        task_step(model, optimizer, digits, step)
    assert len(calls) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fip_trainer_logs_the_distance_of_the_passes_only(digits, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16, anchor_interval=2)
    )
    model.remember(digits["x_a_train"])
    trainer = fip_peft.FIPTrainer(
        model=model, args=trainer_args(tmp_path, steps=4, logging_steps=2), train_dataset=mlp_dataset(digits)
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all("fip_distance" in entry for entry in logged)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"anchor_interval": 0}, ValueError, "FIPConfig.anchor_interval must be >= 1, got 0"),
        ({"anchor_interval": 2.0}, TypeError, "FIPConfig.anchor_interval must be an int"),
        ({"anchor_interval": True}, TypeError, "FIPConfig.anchor_interval must be an int"),
        ({"anchor_interval_mode": "lazy"}, ValueError, "anchor_interval_mode must be one of"),
        ({"anchor_interval": 2, "solver": "natural"}, ValueError, "anchor_interval=2 spaces out the anchor pass"),
    ],
)
def test_config_refuses_a_bad_anchor_interval(settings, error, message):
    with pytest.raises(error, match=message):
        fip_peft.FIPConfig(target_modules=["fc1"], **settings)


def test_anchor_interval_round_trips_through_the_saved_config(tmp_path):
    model = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_interval=4))
    model.save_pretrained(tmp_path)
    loaded = fip_peft.FIPConfig.from_pretrained(tmp_path)
    assert loaded.anchor_interval == 4 and loaded.anchor_interval_mode == "reuse"
