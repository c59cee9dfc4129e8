"""FIP training runs shared by tests/test_distributed.py and its multi-process worker.

Under `torchrun --nproc_per_node 2 -m tests._ddp_worker OUT` every rank trains the same tiny BERT on task B of the
digits (anchors from task A) for `STEPS` SGD steps with `PER_DEVICE_BATCH` examples per process: through
`FIPTrainer` (`TrainingArguments(use_cpu=True)`, so `DistributedType.MULTI_CPU` on gloo), through
`create_fip_optimizer` inside an `accelerate`-prepared loop with the penalty and the natural solver, and in a loop
over the model sharded by FSDP2 (`fully_shard`); then it gathers its share of the natural solver's metric factors.
Each rank saves its final adapter weights and the summed factors to OUT. The data order is
sequential and dropout is off, so 2 processes with batch b see exactly the examples that one process with batch 2b
sees.
"""

from __future__ import annotations

import os
import sys
from functools import cache

import torch
from datasets import Dataset
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import TrainingArguments

import fip_peft
from tests._tasks import as_tokens, digits_tasks, tiny_bert

STEPS = 20
PER_DEVICE_BATCH = 4
LEARNING_RATE = 0.5


def fip_bert(remember: bool = True, **config) -> torch.nn.Module:
    """The same tiny BERT with a FIP adapter (and, by default, 32 task-A anchors) in every process."""
    torch.manual_seed(0)
    settings = {"task_type": "SEQ_CLS", "distance": "kl", "anchor_budget": 32, "anchor_batch_size": 8, **config}
    model = get_peft_model(tiny_bert(), fip_peft.FIPConfig(**settings))
    if remember:
        model.remember(as_tokens(digits()["x_a_train"]))
    return model


@cache
def digits() -> dict[str, torch.Tensor]:
    return digits_tasks()


def task_b(rows: int) -> Dataset:
    data = digits()
    tokens = as_tokens(data["x_b_train"][:rows])
    return Dataset.from_dict(
        {**{k: v.tolist() for k, v in tokens.items()}, "labels": data["y_b_train"][:rows].tolist()}
    )


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def training_args(output_dir: str, batch: int, accumulation: int = 1, **overrides) -> TrainingArguments:
    """SGD at a constant learning rate over the examples in order, no checkpoints unless `overrides` ask."""
    settings = {
        "max_steps": STEPS,
        "optim": "sgd",
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "constant",
        "train_sampling_strategy": "sequential",
        "save_strategy": "no",
        "logging_steps": STEPS,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        **overrides,
    }
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **settings
    )


def train_with_trainer(
    output_dir: str, batch: int, accumulation: int = 1, steps: int = STEPS
) -> dict[str, torch.Tensor]:
    """`FIPTrainer` for `steps` optimizer steps; the adapter weights at the end."""
    model = fip_bert()
    rows = steps * batch * accumulation * int(os.environ.get("WORLD_SIZE", 1))
    args = training_args(output_dir, batch, accumulation, max_steps=steps)
    fip_peft.FIPTrainer(model=model, args=args, train_dataset=task_b(rows)).train()
    return adapter_weights(model)


def train_with_accelerate(batch: int, **config) -> dict[str, torch.Tensor]:
    """`create_fip_optimizer` in a plain loop prepared by `accelerate.Accelerator`; the adapter weights at the end."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = fip_bert(**config)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=LEARNING_RATE)
    data = task_b(STEPS * batch * accelerator.num_processes).with_format("torch")
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    prepared.train()
    for batch_inputs in loader:
        loss = prepared(**batch_inputs).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return adapter_weights(model)


def train_with_fully_shard(batch: int) -> dict[str, torch.Tensor]:
    """`create_fip_optimizer` on the tiny BERT sharded by FSDP2 (`fully_shard` on each encoder layer and the root);
    process r takes batches r, r + N, ... of the sequential data, as a distributed sampler would."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    model = fip_bert()
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=LEARNING_RATE)
    data = task_b(STEPS * batch * world).with_format("torch")[:]
    model.train()
    for step in range(STEPS):
        start = (step * world + rank) * batch
        model(**{k: v[start : start + batch] for k, v in data.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def metric_factors(across_processes: bool) -> dict[str, torch.Tensor]:
    """The natural solver's factors on the 32 anchors, in chunks of 8 (dense A and G per layer), the anchors they
    count and the anchor passes this process ran to gather them."""
    from fip_peft.method.metric import covered_layers, gather_factors

    model = fip_bert(solver="natural", metric_batch_size=8)
    fip_model = model.base_model
    passes = []
    handle = fip_model.model.classifier.register_forward_hook(lambda *_: passes.append(1))
    layers = covered_layers(fip_model, "default")
    factors = gather_factors(fip_model, "default", layers, torch.arange(32), 5, across_processes=across_processes)
    handle.remove()
    result = {"anchors": torch.tensor(factors.num_anchors), "passes": torch.tensor(len(passes))}
    result |= {f"A {name}": factor.dense(float(factor.num_rows)) for name, factor in factors.inputs.items()}
    result |= {f"G {name}": factor.dense(float(factors.num_anchors)) for name, factor in factors.grads.items()}
    return result


def main(out: str) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    results = {
        "trainer": train_with_trainer(os.path.join(out, "trainer"), PER_DEVICE_BATCH),
        "accelerate": train_with_accelerate(PER_DEVICE_BATCH),
        "accelerate_natural": train_with_accelerate(PER_DEVICE_BATCH, solver="natural"),
        "fully_shard": train_with_fully_shard(PER_DEVICE_BATCH),
        "metric_factors": metric_factors(across_processes=True),
    }
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    if dist.is_initialized():  # an undestroyed gloo group can abort the process at exit ("terminate called ...")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
