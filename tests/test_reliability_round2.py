"""Reliability, second round (issue 23): the FIP step cannot be bypassed, a run that trains nothing or has diverged
stops, and loaded state is checked before the model changes."""

import pytest
import torch
from torch import nn

import fip_peft
from tests._tasks import mlp_model


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
