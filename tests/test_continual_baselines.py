"""The baselines of benchmarks/continual.py: replay shares its budget evenly; EWC pulls towards theta*."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from baselines import OnlineEWC, ReplayBuffer  # noqa: E402


def test_replay_buffer_splits_its_budget_evenly_over_the_tasks_seen():
    buffer = ReplayBuffer(budget=12, generator=torch.Generator().manual_seed(0))
    for task in range(3):
        buffer.add_task(task, size=100)
    assert [len(rows) for rows in buffer.per_task] == [4, 4, 4]
    assert {task for task, _ in buffer.sample(200)} == {0, 1, 2}


def test_ewc_penalty_is_zero_at_the_consolidated_weights_and_grows_away_from_them():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = torch.randn(8, 3)
    labels = torch.randint(0, 2, (8,))

    def collate(rows):
        index = torch.tensor([row for _, row in rows])
        return {"input": data[index]}, labels[index]

    ewc = OnlineEWC(lam=10.0, samples=8)
    assert ewc.penalty(model) is None
    ewc.consolidate(model, [(0, i) for i in range(8)], collate, lambda m, x: torch.log_softmax(m(**x), dim=-1))
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        model.weight.add_(0.5)
    assert ewc.penalty(model).item() > 0.0
