"""Reliability, second round (issue 23): the FIP step cannot be bypassed, a run that trains nothing or has diverged
stops, and loaded state is checked before the model changes."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import fip_peft
from fip_peft.method.checks import NonFiniteStepError
from tests._tasks import MLP, as_tokens, mlp_model, tiny_bert


class LossMLP(MLP):
    """The test MLP returning a loss, as `Trainer` expects."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = super().forward(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mlp_dataset(digits, rows=64):
    x, y = digits["x_b_train"][:rows], digits["y_b_train"][:rows]
    return Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")


def trainer_args(tmp_path, steps=4, **kwargs):
    settings = {
        "output_dir": str(tmp_path),
        "max_steps": steps,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
    }
    return TrainingArguments(**(settings | kwargs))


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def assert_unchanged(model, before):
    for name, value in adapter_state(model).items():
        assert torch.equal(value, before[name]), name


# ---- optimizer.step(closure) ----------------------------------------------------------------------------------------


def test_a_step_with_a_closure_is_the_fip_step_not_plain_sgd(digits):
    x, y = digits["x_b_train"][:32], digits["y_b_train"][:32]
    models = []
    for use_closure in (False, True):
        torch.manual_seed(0)
        model = mlp_model(anchor_budget=16, init_weights=False)
        model.remember(digits["x_a_train"])
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
        model.train()
        losses = []
        for _ in range(5):

            def closure(model=model, optimizer=optimizer):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if use_closure:
                losses.append(optimizer.step(closure))
            else:
                losses.append(closure())
                optimizer.step()
        models.append((model, losses))
    (reference, reference_losses), (closured, losses) = models
    for (name, a), b in zip(adapter_state(reference).items(), adapter_state(closured).values(), strict=True):
        torch.testing.assert_close(b, a, msg=name)
    torch.testing.assert_close(torch.stack(losses), torch.stack(reference_losses))
    assert all(isinstance(loss, torch.Tensor) for loss in losses)


# ---- 1. the FIP step guard cannot be bypassed -----------------------------------------------------------------------


def test_a_plain_optimizer_in_eval_mode_is_refused_before_anything_moves(digits):
    model = mlp_model(anchor_budget=16)
    model.remember(digits["x_a_train"])
    model.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = adapter_state(model)
    nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16]).backward()
    with pytest.raises(RuntimeError, match=r"AdamW that is not a FIP optimizer.*'default'.*create_fip_optimizer"):
        optimizer.step()
    assert_unchanged(model, before)
    assert not optimizer.state


def test_trainer_with_its_own_optimizer_is_refused_even_when_a_fip_optimizer_exists(digits, tmp_path):
    model = get_peft_model(LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16))
    model.remember(digits["x_a_train"])
    unused = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-2)  # created, not given to Trainer
    before = adapter_state(model)
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=mlp_dataset(digits))
    with pytest.raises(RuntimeError, match=r"not a FIP optimizer.*created but not passed is not used"):
        trainer.train()
    assert_unchanged(model, before)
    assert int(model.base_model.memory().sample_step) == 0
    assert unused.fip_steps == 0


def test_plain_optimizers_still_train_models_without_anchors_and_fip_optimizers_still_step(digits):
    model = mlp_model(anchor_budget=16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16]).backward()
    optimizer.step()  # nothing remembered: plain training is what FIP does
    model.remember(digits["x_a_train"])
    fip = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    model.eval()
    before = adapter_state(model)
    nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16]).backward()
    fip.step()
    assert any(not torch.equal(v, before[k]) for k, v in adapter_state(model).items())


# ---- 2. switching the active adapter under a FIP optimizer ----------------------------------------------------------


def test_a_fip_optimizer_of_another_adapter_refuses_to_step_instead_of_training_nothing(digits):
    model = mlp_model(anchor_budget=16)
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    model.train()
    x, y = digits["x_b_train"][:16], digits["y_b_train"][:16]
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.add_adapter("second", fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16))
    model.set_adapter("second")
    model.remember(digits["x_a_train"])
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"active adapter 'second'.*create_fip_optimizer"):
        optimizer.step()
    model.delete_adapter("default")
    with pytest.raises(RuntimeError, match="set_adapter` or `delete_adapter"):
        optimizer.step()


# ---- 3. a diverged run stops and is not saved -----------------------------------------------------------------------


def test_consecutive_skipped_steps_stop_the_run_with_advice(digits, caplog):
    model = mlp_model(anchor_budget=16, max_consecutive_skips=3)
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    model.train()
    bad = digits["x_b_train"][:16].clone()
    bad[0, 0] = float("nan")
    y = digits["y_b_train"][:16]

    def step(x):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(bad)
    step(bad)
    step(digits["x_b_train"][:16])  # a good step resets the count
    step(bad)
    step(bad)
    with pytest.raises(NonFiniteStepError, match=r"step 6.*last 3 steps were all skipped.*max_consecutive_skips=3"):
        step(bad)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_consecutive_skips_must_be_a_positive_int_or_none(value):
    with pytest.raises((ValueError, TypeError), match="max_consecutive_skips"):
        fip_peft.FIPConfig(max_consecutive_skips=value)
    assert fip_peft.FIPConfig(max_consecutive_skips=None).max_consecutive_skips is None


def test_an_adapter_whose_outputs_on_its_anchors_are_infinite_is_not_saved(digits, tmp_path):
    model = mlp_model(anchor_budget=16)
    model.remember(digits["x_a_train"])
    with torch.no_grad():
        for layer in (model.base_model.model.fc1, model.base_model.model.fc2):
            layer.fip_delta["default"].fill_(1e20)  # finite weights, infinite outputs
    with pytest.raises(ValueError, match=r"Refusing to save FIP adapter 'default'.*anchors are NaN or infinite"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ---- 5. loaded anchor memory is checked; 13. a failed load changes nothing ------------------------------------------


def saved_adapter(path, digits, model=None):
    model = model if model is not None else mlp_model(anchor_budget=8, init_weights=False)
    model.remember(digits["x_a_train"])
    model.save_pretrained(path)
    return model


def damage_memory(path, **changes):
    tensors = load_file(path / "adapter_model.safetensors")
    for key, change in changes.items():
        name = f"base_model.fip_memory.{key}"
        tensors[name] = change(tensors[name])
    save_file(tensors, path / "adapter_model.safetensors")


def base_state(model):
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
    )


def assert_base_untouched(model, before):
    modules, params = base_state(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for name, (value, flag) in params.items():
        assert torch.equal(value, before[1][name][0]) and flag == before[1][name][1], name
    assert not hasattr(model, "peft_config")
    assert not model._forward_pre_hooks


def nan_first(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize(
    ("key", "change", "error", "match"),
    [
        ("anchor___positional", nan_first, ValueError, "NaN or infinite"),
        ("anchor___positional", lambda t: t[:, :32].contiguous(), ValueError, r"do not fit this model.*mat1"),
        ("reference", lambda t: torch.full_like(t, float("inf")), ValueError, "NaN or infinite reference"),
        ("reference", lambda t: t[:, :4].contiguous(), ValueError, r"shape \(4,\) per anchor.*outputs \(10,\)"),
        ("scale", lambda t: torch.zeros_like(t), ValueError, r"scale=0\.0.*finite number > 0"),
        ("scale", lambda t: -torch.ones_like(t), ValueError, r"scale=-1\.0.*away from the remembered"),
        ("task_ids", lambda t: t - 5, ValueError, "task ids that are not integers >= 0"),
    ],
)
def test_a_saved_anchor_memory_the_model_cannot_use_is_refused_and_the_base_is_untouched(
    digits, tmp_path, key, change, error, match
):
    saved_adapter(tmp_path, digits)
    damage_memory(tmp_path, **{key: change})
    base = MLP()
    before = base_state(base)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base, tmp_path)
    assert_base_untouched(base, before)


def test_anchor_ids_beyond_the_vocabulary_of_the_model_loading_them_are_refused(digits, tmp_path):
    model = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=8))
    model.remember(as_tokens(digits["x_a_train"][:8]))
    model.save_pretrained(tmp_path)
    small = tiny_bert()
    small.resize_token_embeddings(50)
    before = base_state(small)
    with pytest.raises(ValueError, match=r"adapter 'default' does not fit this model.*input_ids.*0\.\.49"):
        PeftModel.from_pretrained(small, tmp_path)
    assert_base_untouched(small, before)


def test_an_adapter_of_another_width_leaves_the_base_model_as_it_was(digits, tmp_path):
    saved_adapter(tmp_path, digits, get_peft_model(MLP(hidden=32), fip_peft.FIPConfig(target_modules=["fc1", "fc2"])))
    base = MLP(hidden=48)
    before = base_state(base)
    with pytest.raises((RuntimeError, ValueError), match="size mismatch|do not fit"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_base_untouched(base, before)
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)  # the plain model trains as before
    nn.functional.cross_entropy(base(digits["x_b_train"][:8]), digits["y_b_train"][:8]).backward()
    optimizer.step()


def test_load_adapter_that_fails_removes_the_new_adapter_again(digits, tmp_path):
    saved_adapter(tmp_path, digits)
    damage_memory(tmp_path, scale=lambda t: torch.zeros_like(t))
    model = mlp_model(anchor_budget=8)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="scale=0"):
        model.load_adapter(tmp_path, adapter_name="second")
    assert set(model.peft_config) == {"default"}
    assert set(model.base_model.fip_memory) == {"default"}
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


# ---- 8. a list of batches ----------------------------------------------------------------------------------------


def test_a_list_of_batches_is_remembered_whole_and_an_inputs_labels_pair_still_reads_as_one_batch(digits):
    x = digits["x_a_train"][:30]
    model = mlp_model(anchor_budget=64)
    model.remember([x[:10], x[10:20], x[20:30]])
    stored = model.base_model.memory().inputs["_positional"]
    assert stored.shape[0] == 30
    assert sorted(stored.sum(1).tolist()) == sorted(x.sum(1).tolist())
    pair = mlp_model(anchor_budget=64)
    pair.remember((x, digits["y_a_train"][:30]))
    assert torch.equal(pair.base_model.memory().inputs["_positional"].sum(), x.sum())
    tokens = [as_tokens(digits["x_a_train"][:5]), as_tokens(digits["x_a_train"][5:12])]
    bert = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=64))
    bert.remember(tokens)
    assert len(bert.base_model.memory()) == 12


# ---- 7. token ids without an attention mask are not zero-padded -----------------------------------------------------


def test_token_ids_of_another_length_without_an_attention_mask_are_refused_not_zero_padded(digits):
    model = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=32))
    short = {"input_ids": as_tokens(digits["x_a_train"][:8])["input_ids"][:, :40]}
    model.remember(short)
    reference = model.base_model.memory().reference.clone()
    longer = {"input_ids": as_tokens(digits["x_b_train"][:8])["input_ids"]}
    with pytest.raises(ValueError, match=r"'input_ids' holds integer sequences of different lengths.*attention_mask"):
        model.remember(longer)
    assert torch.equal(model.base_model.memory().reference, reference)
    ragged = Dataset.from_dict({"input_ids": [[1, 5, 9], [1, 5, 9, 13, 17]]})
    with pytest.raises(ValueError, match="different lengths"):
        get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS")).remember(ragged)
    masked = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=32))
    masked.remember(as_tokens(digits["x_a_train"][:8]))
    tokens = as_tokens(digits["x_b_train"][:8])
    masked.remember({k: v[:, :30] for k, v in tokens.items()})  # with a mask, padding is sound


# ---- 12. errors of the documented kinds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (torch.tensor(3.0), ValueError, "0-dimensional"),
        ({"x": torch.tensor(1)}, ValueError, "'x' is a 0-dimensional"),
        (torch.rand(8, 64, device="meta"), ValueError, "meta device"),
        (torch.rand(8, 64).to_sparse(), TypeError, "dense"),
        (torch.rand(8, 64, dtype=torch.complex64), TypeError, "complex"),
    ],
)
def test_tensors_remember_cannot_store_give_a_value_or_type_error_naming_them(data, error, match):
    model = mlp_model(anchor_budget=8)
    with pytest.raises(error, match=match):
        model.remember(data)
    assert len(model.base_model.memory()) == 0


# ---- 6. the fixed-length natural step leaves a group with lr 0 where it is ------------------------------------------


def test_the_epsilon_step_does_not_move_a_parameter_group_whose_learning_rate_is_zero(digits):
    model = mlp_model(anchor_budget=16, solver="natural", epsilon=0.1)
    model.remember(digits["x_a_train"])
    fc1 = [p for n, p in model.named_parameters() if "fc1.fip_delta" in n]
    fc2 = [p for n, p in model.named_parameters() if "fc2.fip_delta" in n]
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
    optimizer.param_groups.clear()
    optimizer.add_param_group({"params": fc1, "lr": 0.0})
    optimizer.add_param_group({"params": fc2, "lr": 0.1})
    frozen, moving = fc1[0].detach().clone(), fc2[0].detach().clone()
    model.train()
    nn.functional.cross_entropy(model(digits["x_b_train"][:16]), digits["y_b_train"][:16]).backward()
    optimizer.step()
    assert torch.equal(fc1[0], frozen)
    assert not torch.equal(fc2[0], moving)


# ---- 4. plain Trainer with gradient accumulation --------------------------------------------------------------------


def token_dataset(digits, rows=64):
    tokens = as_tokens(digits["x_b_train"][:rows])
    return Dataset.from_dict(
        {**{k: v.tolist() for k, v in tokens.items()}, "labels": digits["y_b_train"][:rows].tolist()}
    )


def test_plain_trainer_with_accumulation_that_would_change_beta_is_refused_pointing_to_fip_trainer(digits, tmp_path):
    model = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=16))
    model.remember(as_tokens(digits["x_a_train"][:16]))
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-3)
    before = adapter_state(model)
    args = trainer_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(digits), optimizers=(optimizer, None))
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4.*4x too large.*FIPTrainer"):
        trainer.train()
    assert_unchanged(model, before)


def test_plain_trainer_with_accumulation_on_a_model_it_averages_right_still_trains(digits, tmp_path):
    model = get_peft_model(LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16))
    model.remember(digits["x_a_train"])
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-2)
    args = trainer_args(tmp_path, steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    Trainer(model=model, args=args, train_dataset=mlp_dataset(digits), optimizers=(optimizer, None)).train()
    assert optimizer.fip_steps == 2


# ---- 11. a skipped step leaves the natural solver's state as it was -------------------------------------------------


@pytest.mark.parametrize("solver", ["natural", "natural+penalty", "penalty", "projection", "projection+penalty"])
def test_a_skipped_step_changes_no_sampling_or_metric_state(digits, solver):
    x, y = digits["x_b_train"], digits["y_b_train"]
    bad = x[:16].clone()
    bad[0, 0] = float("nan")
    runs = []
    for with_skip in (False, True):
        torch.manual_seed(0)
        model = mlp_model(anchor_budget=32, anchor_batch_size=8, solver=solver, metric_update_interval=2)
        model.remember(digits["x_a_train"])
        optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.1)
        model.train()
        batches = [x[:16], x[16:32], x[32:48], x[48:64]]
        if with_skip:
            batches.insert(1, bad)
        for batch in batches:
            nn.functional.cross_entropy(model(batch), y[:16]).backward()
            optimizer.step()
            optimizer.zero_grad()
        preconditioner = getattr(optimizer, "_fip_preconditioner", None)
        counters = (preconditioner.steps, preconditioner.refreshes) if preconditioner is not None else None
        runs.append((adapter_state(model), int(model.base_model.memory().sample_step), counters))
    (params, sample_step, counters), (skipped_params, skipped_sample_step, skipped_counters) = runs
    assert skipped_sample_step == sample_step and skipped_counters == counters
    for name, value in params.items():
        torch.testing.assert_close(skipped_params[name], value, atol=0, rtol=0, msg=name)


# ---- 9. anchors that differ between processes -----------------------------------------------------------------------


@pytest.mark.distributed
def test_anchor_memories_that_differ_between_processes_give_a_clear_error_on_every_process(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"]
    result = subprocess.run(
        [*command, "tests._anchor_count_worker", str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["trainer"]["error"] == "ValueError", results["trainer"]
        assert "differ across the 2 processes (different anchor counts" in results["trainer"]["message"]
        assert "{'default': [16, 8]}" in results["trainer"]["message"]
        assert results["loop"]["error"] == "ValueError", results["loop"]
        assert "the same counts but different anchors" in results["loop"]["message"]


# ---- 10. checkpoints and staging folders ----------------------------------------------------------------------------


def test_fip_trainer_resumes_from_the_newest_complete_checkpoint(digits, tmp_path, caplog):
    def trainer():
        torch.manual_seed(0)
        model = get_peft_model(LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16))
        model.remember(digits["x_a_train"])
        args = trainer_args(tmp_path, steps=4, save_strategy="steps", save_steps=2)
        return fip_peft.FIPTrainer(model=model, args=args, train_dataset=mlp_dataset(digits))

    trainer().train()
    killed = tmp_path / "checkpoint-4"
    (killed / "trainer_state.json").unlink()  # killed before Trainer wrote its last file
    weights = killed / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (tmp_path / "checkpoint-6").mkdir()  # killed right after making the folder
    resumed = trainer()
    with caplog.at_level(logging.WARNING, logger="fip_peft"):
        resumed.train(resume_from_checkpoint=True)
    assert "skipping the incomplete checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    assert resumed.state.global_step == 4


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_weights_and_config_of_two_different_saves_are_refused_at_load(digits, tmp_path, monkeypatch):
    path = tmp_path / "adapter"
    get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], rank=4)).save_pretrained(path)
    full_rank = mlp_model(init_weights=False)
    replace = os.replace

    def killed_before_the_config(source, destination):
        if str(destination).endswith("adapter_config.json"):
            raise Killed
        replace(source, destination)

    monkeypatch.setattr(os, "replace", killed_before_the_config)
    with pytest.raises(Killed):
        full_rank.save_pretrained(path)
    monkeypatch.setattr(os, "replace", replace)
    base = MLP()
    before = base_state(base)
    with pytest.raises(ValueError, match=r"do not match its adapter_config\.json \(rank=4\).*two different saves"):
        PeftModel.from_pretrained(base, path)
    assert_base_untouched(base, before)


def test_saving_removes_the_staging_folders_of_killed_saves_of_that_adapter(tmp_path, digits):
    path = tmp_path / "adapter"
    model = mlp_model()
    model.save_pretrained(path)
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [
        tmp_path / f".adapter.{host}-{int(dead.stdout)}.ab12cd34.tmp",
        tmp_path / f".checkpoint-3.{host}-{int(dead.stdout)}.mn34op56.tmp",  # a killed save of another folder
        tmp_path / ".adapter.old12345.tmp",  # an older fip_peft's, untouched for 2 hours
    ]
    kept = [
        tmp_path / f".adapter.{host}-{os.getpid()}.ef56gh78.tmp",  # a save in progress
        tmp_path / f".adapter.elsewhere-{int(dead.stdout)}.ij90kl12.tmp",  # another host's
        tmp_path / ".adapter.new12345.tmp",  # an older fip_peft's, recent: maybe still saving
        tmp_path / ".other.old12345.tmp",  # an older fip_peft's, of another folder
    ]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
    for folder in (stale[2], kept[3]):
        os.utime(folder, (time.time() - 7200, time.time() - 7200))
    model.save_pretrained(path)
    assert not any(folder.exists() for folder in stale)
    assert all(folder.exists() for folder in kept)


def test_fip_trainer_starts_afresh_when_its_only_checkpoint_is_incomplete(digits, tmp_path, caplog):
    model = get_peft_model(LossMLP(), fip_peft.FIPConfig(target_modules=["fc1", "fc2"], anchor_budget=16))
    model.remember(digits["x_a_train"])
    (tmp_path / "checkpoint-1").mkdir()  # killed while writing the first checkpoint
    args = trainer_args(tmp_path, steps=2, save_strategy="steps", save_steps=1)
    trainer = fip_peft.FIPTrainer(model=model, args=args, train_dataset=mlp_dataset(digits))
    with caplog.at_level(logging.WARNING, logger="fip_peft"):
        trainer.train(resume_from_checkpoint=True)
    assert "no complete checkpoint" in caplog.text and trainer.state.global_step == 2
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()


# ---- 11. resuming a natural-solver run ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["natural+penalty", "projection+penalty"])
def test_resuming_a_metric_solver_run_lands_where_the_uninterrupted_run_does(tmp_path, solver):
    from tests import _ddp_worker as worker

    def trainer(model, out, **overrides):
        args = worker.training_args(str(out), 4, max_steps=6, **overrides)
        return fip_peft.FIPTrainer(model=model, args=args, train_dataset=worker.task_b(24))

    config = {"solver": solver, "metric_update_interval": 4}
    uninterrupted = worker.fip_bert(**config)
    trainer(uninterrupted, tmp_path, save_strategy="steps", save_steps=3).train()
    resumed = worker.fip_bert(remember=False, **config)
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    memory, expected_memory = resumed.base_model.memory(), uninterrupted.base_model.memory()
    assert int(memory.sample_step) == int(expected_memory.sample_step)
    expected = worker.adapter_weights(uninterrupted)
    for name, value in worker.adapter_weights(resumed).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)
