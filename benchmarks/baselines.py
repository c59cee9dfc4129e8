"""Continual-learning baselines that FIP is compared against: EWC and experience replay with labels.

Benchmark code, not part of the package. Both work on any model whose trainable parameters are the ones a
continual method may move (``requires_grad``), and on examples named by ``(task, row)`` so that a suite builds the
batch (images are stacked, token ids are padded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Example = tuple[int, int]  # (task index, row index in that task's training split)
Collate = Callable[[Sequence[Example]], tuple[dict[str, torch.Tensor], torch.Tensor]]
LogProbs = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class OnlineEWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017), online form (Schwarz et al. 2018, gamma = 1).

    After each task the diagonal empirical Fisher F_t = E[(d log p(y|x) / d theta)^2] is estimated from
    ``samples`` single-example gradients on the task's training data (true labels) and added to the running sum F;
    theta* becomes the current weights. Training then adds ``lam / 2 * sum F (theta - theta*)^2`` to the loss.
    """

    def __init__(self, lam: float, samples: int) -> None:
        self.lam = lam
        self.samples = samples
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """``lam / 2 * sum F (theta - theta*)^2`` over the trainable parameters, or None before the first task."""
        if not self.fisher:
            return None
        terms = [
            (self.fisher[name] * (param - self.anchor[name]).pow(2)).sum()
            for name, param in model.named_parameters()
            if name in self.fisher
        ]
        return self.lam / 2 * torch.stack(terms).sum()

    def consolidate(self, model: nn.Module, rows: Sequence[Example], collate: Collate, log_probs: LogProbs) -> None:
        """Add the Fisher of the task whose examples are ``rows`` (``samples`` of them are used) and move theta*."""
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        fisher = {name: torch.zeros_like(p) for name, p in params.items()}
        was_training = model.training
        model.eval()
        for row in rows[: self.samples]:
            inputs, labels = collate([row])
            model.zero_grad(set_to_none=True)
            log_probs(model, inputs).gather(1, labels[:, None]).sum().backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().pow(2)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        count = min(self.samples, len(rows))
        for name, value in fisher.items():
            self.fisher[name] = self.fisher.get(name, torch.zeros_like(value)) + value / count
            self.anchor[name] = params[name].detach().clone()


class ReplayBuffer:
    """Experience replay with labels: a fixed budget of stored training examples, split evenly over seen tasks.

    ``add_task`` keeps ``budget // tasks`` random examples of the new task and shrinks each earlier task's share to
    the same size (as FIP's anchors are shared); ``sample`` draws a batch with replacement from all of them.
    """

    def __init__(self, budget: int, generator: torch.Generator) -> None:
        self.budget = budget
        self.generator = generator
        self.per_task: list[list[Example]] = []

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.per_task)

    def add_task(self, task: int, size: int) -> None:
        share = max(1, self.budget // (len(self.per_task) + 1))
        order = torch.randperm(size, generator=self.generator)[:share].tolist()
        self.per_task = [rows[:share] for rows in self.per_task]
        self.per_task.append([(task, row) for row in order])

    def sample(self, batch_size: int) -> list[Example]:
        rows = [row for task_rows in self.per_task for row in task_rows]
        picks = torch.randint(len(rows), (batch_size,), generator=self.generator).tolist()
        return [rows[i] for i in picks]
