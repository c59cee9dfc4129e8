"""The baselines of benchmarks/continual.py: replay shares its budget evenly; EWC pulls towards theta*; DER keeps
stored logits; ER-ACE masks the old classes."""

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


def test_der_matches_the_logits_stored_at_the_end_of_each_task_and_der_pp_adds_their_labels():
    from continual import DERLearner, build_suite

    suite = build_suite("vision", True, 0)
    torch.manual_seed(0)
    der = DERLearner(suite, 0, alpha=0.3)
    der.start(suite.build_model())
    assert der.extra_loss() is None
    der.end_task(0)
    assert len(der.logits) == len(der.buffer) > 0
    assert der.extra_loss().item() == 0.0  # the model has not moved since its logits were stored
    with torch.no_grad():
        der.model.base_model.model.head.modules_to_save.default.bias.add_(1.0)
    assert der.extra_loss().item() > 0.0
    derpp = DERLearner(suite, 0, alpha=0.0, beta=1.0)
    derpp.start(suite.build_model())
    derpp.end_task(0)
    assert derpp.extra_loss().item() > 0.0  # the labels' cross-entropy of an untrained head


def test_er_ace_leaves_the_old_classes_absent_from_the_batch_out_of_the_new_task_s_loss():
    from continual import ERACELearner, build_suite

    suite = build_suite("vision", True, 0)
    learner = ERACELearner(suite, 0)
    logits, labels = torch.randn(4, 10), torch.tensor([2, 3, 3, 2])
    full = learner.task_loss(logits, labels)
    torch.testing.assert_close(full, nn.functional.cross_entropy(logits, labels))
    learner.start(suite.build_model())
    learner.begin_task(0)
    learner.end_task(0)  # classes 0 and 1 are old from now on
    kept = [c for c in range(10) if c not in (0, 1)]
    expected = nn.functional.cross_entropy(logits[:, kept], labels - 2)
    torch.testing.assert_close(learner.task_loss(logits, labels), expected)
