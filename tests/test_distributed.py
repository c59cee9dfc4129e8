"""Scale-out: 2 processes (DDP and FSDP2 on gloo), gradient accumulation, bf16 autocast, gradient checkpointing,
resuming from checkpoints, and the engines FIP refuses.

The multi-process tests launch `torchrun --nproc_per_node 2 -m tests._ddp_worker` once (marker `distributed`,
run by default; `-m "not distributed"` skips them).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

import fip_peft
from fip_peft.integrations.trainer import FIP_STATE_NAME, loss_uses_num_items
from fip_peft.optimizers.distributed import check_supported_engine
from tests import _ddp_worker as worker

ATOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_adapter(actual: dict, expected: dict, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    moved = max(float(v.abs().max()) for v in expected.values())
    assert moved > 100 * atol, "the adapter barely moved: the comparison would be vacuous"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """Final adapters of every rank of a 2-process run with per-device batch b (both training paths)."""
    out = tmp_path_factory.mktemp("ddp")
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tests._ddp_worker"]
    result = subprocess.run([*command, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.distributed
def test_every_process_applies_the_same_update(two_processes):
    for path in ("trainer", "accelerate", "accelerate_natural"):
        assert_same_adapter(two_processes[1][path], two_processes[0][path], atol=0.0)


@pytest.mark.distributed
def test_fip_trainer_on_two_processes_matches_one_process_with_twice_the_batch(two_processes, tmp_path):
    expected = worker.train_with_trainer(str(tmp_path), 2 * worker.PER_DEVICE_BATCH)
    assert_same_adapter(two_processes[0]["trainer"], expected)


@pytest.fixture(scope="module")
def one_process_loop() -> dict:
    """The adapter after the plain loop on one process with batch 2b."""
    return worker.train_with_accelerate(2 * worker.PER_DEVICE_BATCH)


@pytest.mark.distributed
def test_accelerate_loop_on_two_processes_matches_one_process_with_twice_the_batch(two_processes, one_process_loop):
    assert_same_adapter(two_processes[0]["accelerate"], one_process_loop)


@pytest.mark.distributed
def test_fully_shard_on_two_processes_matches_one_process_with_twice_the_batch(two_processes, one_process_loop):
    assert_same_adapter(two_processes[0]["fully_shard"], one_process_loop)


@pytest.mark.distributed
def test_natural_solver_on_two_processes_matches_one_process_with_twice_the_batch(two_processes):
    expected = worker.train_with_accelerate(2 * worker.PER_DEVICE_BATCH, solver="natural")
    # The two processes sum their halves of each metric refresh, one process sums the chunks in turn: the factors
    # agree to float rounding (next test), and the eigen-directions near the truncation threshold that rounding
    # moves across it leave a trace of ~1e-4 of the largest move after 20 steps at lr 0.5.
    assert_same_adapter(two_processes[0]["accelerate_natural"], expected, atol=1e-3)


@pytest.mark.distributed
def test_two_processes_each_gather_half_of_a_refresh_and_sum_to_the_factors_of_one(two_processes):
    expected = worker.metric_factors(across_processes=False)
    for result in two_processes:
        factors = result["metric_factors"]
        assert int(factors["passes"]) * 2 == int(expected["passes"]) == 4
        assert int(factors["anchors"]) == int(expected["anchors"]) == 32
        assert factors.keys() == expected.keys()
        for name, matrix in expected.items():
            if name in ("passes", "anchors"):
                continue
            scale = float(matrix.float().abs().max())
            torch.testing.assert_close(factors[name], matrix, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_gradient_accumulation_of_two_matches_twice_the_batch(tmp_path):
    batch = worker.PER_DEVICE_BATCH
    accumulated = worker.train_with_trainer(str(tmp_path / "accumulated"), batch, accumulation=2, steps=10)
    assert_same_adapter(accumulated, worker.train_with_trainer(str(tmp_path / "batch"), 2 * batch, steps=10))


def test_fip_trainer_sees_which_model_losses_divide_by_the_global_item_count():
    causal_lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert loss_uses_num_items(causal_lm)
    assert not loss_uses_num_items(worker.fip_bert(remember=False))


def test_deepspeed_and_megatron_are_refused_with_a_clear_error():
    for engine in ("DEEPSPEED", "MEGATRON_LM"):
        with pytest.raises(NotImplementedError, match="Use DDP instead"):
            check_supported_engine(engine)
    check_supported_engine("MULTI_CPU")


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded_step_error(model, optimizer) -> str:
    """Take one FIP step on an FSDP2-sharded model expecting a refusal; check that nothing changed; the message."""
    model(**worker.task_b(4).with_format("torch")[:]).loss.backward()
    before = {name: p.full_tensor().clone() for name, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(NotImplementedError) as error:
        optimizer.step()
    assert int(model.base_model.memory().sample_step) == 0
    assert all(torch.equal(p.full_tensor(), before[name]) for name, p in model.named_parameters() if p.requires_grad)
    return str(error.value)


def test_fip_optimizer_created_before_fully_shard_is_refused_before_changing_anything(single_process_group):
    model = worker.fip_bert()
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=worker.LEARNING_RATE)
    fully_shard(model, mesh=single_process_group)
    assert "create it after sharding" in sharded_step_error(model, optimizer)


def test_natural_solver_on_fully_shard_parameters_is_refused_before_changing_anything(single_process_group):
    model = worker.fip_bert(solver="natural")
    fully_shard(model, mesh=single_process_group)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=worker.LEARNING_RATE)
    assert "needs the penalty solver" in sharded_step_error(model, optimizer)


@pytest.mark.parametrize("criterion", ["saliency", "obs"])
def test_metric_criterion_sparsify_on_fully_shard_parameters_is_refused_before_changing_anything(
    single_process_group, criterion
):
    model = worker.fip_bert(
        objective="sparsify", target_sparsity=0.5, sparsity_criterion=criterion, sparsity_scope="layer"
    )
    fully_shard(model, mesh=single_process_group)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=worker.LEARNING_RATE)
    assert "sparsity_criterion='magnitude'" in sharded_step_error(model, optimizer)


def fip_trainer(model, output_dir, steps: int = 6, **overrides) -> fip_peft.FIPTrainer:
    args = worker.training_args(str(output_dir), worker.PER_DEVICE_BATCH, max_steps=steps, **overrides)
    return fip_peft.FIPTrainer(model=model, args=args, train_dataset=worker.task_b(steps * worker.PER_DEVICE_BATCH))


def test_fip_trainer_trains_under_bf16_autocast(tmp_path):
    model = worker.fip_bert()
    trainer = fip_trainer(model, tmp_path, steps=4, bf16=True, logging_steps=1)
    trainer.train()
    assert int(model.base_model.memory().sample_step) == 4
    distances = [entry["fip_distance"] for entry in trainer.state.log_history if "fip_distance" in entry]
    assert len(distances) == 4 and all(0 <= d < float("inf") for d in distances) and distances[-1] > 0
    assert all(torch.isfinite(p).all() for p in worker.adapter_weights(model).values())


def test_fip_step_works_in_a_loop_under_torch_autocast_bf16():
    model = worker.fip_bert()
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=worker.LEARNING_RATE)
    data = worker.task_b(16).with_format("torch")[:]
    before = worker.adapter_weights(model)
    for start in range(0, 16, 4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**{k: v[start : start + 4] for k, v in data.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = worker.adapter_weights(model)
    assert optimizer.pop_mean_distance() > 0
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    plain = worker.fip_bert()
    fip_trainer(plain, tmp_path / "plain", steps=4).train()
    checkpointed = worker.fip_bert()
    fip_trainer(checkpointed, tmp_path / "checkpointed", steps=4, gradient_checkpointing=True).train()
    assert_same_adapter(worker.adapter_weights(checkpointed), worker.adapter_weights(plain))


def test_resuming_mid_way_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    uninterrupted = worker.fip_bert()
    fip_trainer(uninterrupted, tmp_path, save_strategy="steps", save_steps=3).train()
    checkpoint = tmp_path / "checkpoint-3"
    assert {"adapter_model.safetensors", "optimizer.pt", FIP_STATE_NAME} <= set(os.listdir(checkpoint))
    resumed = worker.fip_bert(remember=False)
    fip_trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    assert len(resumed.base_model.memory()) == len(uninterrupted.base_model.memory())
    assert int(resumed.base_model.memory().sample_step) == 6
    assert_same_adapter(worker.adapter_weights(resumed), worker.adapter_weights(uninterrupted), atol=1e-6)


def test_resuming_without_saved_anchors_asks_to_remember_them_again(tmp_path):
    fip_trainer(worker.fip_bert(save_anchors=False), tmp_path, steps=3, save_strategy="steps", save_steps=3).train()
    trainer = fip_trainer(worker.fip_bert(remember=False, save_anchors=False), tmp_path / "resumed")
    with pytest.raises(ValueError, match="save_anchors=False.*remember"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_resuming_without_saved_anchors_continues_the_anchor_sequence_once_remembered_again(tmp_path):
    uninterrupted = worker.fip_bert(save_anchors=False)
    fip_trainer(uninterrupted, tmp_path, save_strategy="steps", save_steps=3).train()
    resumed = worker.fip_bert(save_anchors=False)
    fip_trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert int(resumed.base_model.memory().sample_step) == 6
    assert_same_adapter(worker.adapter_weights(resumed), worker.adapter_weights(uninterrupted), atol=1e-6)
