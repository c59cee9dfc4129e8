"""`FIPTrainer` overrides three private `transformers.Trainer` methods where no public extension point can do the
job (the reason is one line above each override). These tests pin what the overrides rely on, so that a transformers
release that renames or stops calling them fails here instead of silently dropping the FIP checkpoint state or
clipping the task gradient alone."""

import inspect

import pytest
from transformers import Trainer, TrainerCallback

import fip_peft

OVERRIDES = {
    "_save_optimizer_and_scheduler": ["self", "output_dir"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_clip_grad_norm": ["self", "model"],
}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_each_overridden_trainer_method_exists_with_the_signature_fip_overrides(name):
    assert list(inspect.signature(getattr(Trainer, name)).parameters) == OVERRIDES[name]
    assert list(inspect.signature(getattr(fip_peft.FIPTrainer, name)).parameters) == OVERRIDES[name]
    assert getattr(fip_peft.FIPTrainer, name) is not getattr(Trainer, name)


def test_trainer_calls_each_overridden_method_from_its_training_loop():
    source = inspect.getsource(inspect.getmodule(Trainer))
    for name in OVERRIDES:
        assert f"self.{name}(" in source


def test_the_skipped_step_report_goes_through_the_public_callback_api():
    assert "on_optimizer_step" in vars(TrainerCallback)
