"""Adapters saved by an earlier fip_peft (tests/fixtures, written by `make_saved_adapters.py` at commit adad689) load
and compute the same function: the saved-adapter format and the meaning of the sparsity state do not change."""

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

import fip_peft  # noqa: F401 - registers FIP
from tests.fixtures.make_saved_adapters import TinyMLP

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load(folder: Path) -> PeftModel:
    """The fixture's adapter on its base, after checking it computes the outputs the old code saved."""
    base = TinyMLP()
    base.load_state_dict(load_file(folder / "base.safetensors"))
    model = PeftModel.from_pretrained(base, folder / "adapter", is_trainable=True)
    expected = load_file(folder / "expected.safetensors")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(expected["inputs"]), expected["outputs"], rtol=0, atol=1e-6)
    return model


def test_a_saved_continual_adapter_loads_with_its_anchors_history_and_outputs():
    folder = FIXTURES / "saved_adapter_continual"
    model = load(folder)
    memory = model.base_model.memory()
    assert memory.anchors_per_task() == [6, 6]
    assert bool((memory.labels[:6] != -100).all()) and bool((memory.labels[6:] == -100).all())
    assert model.peft_config["default"].task_names == ["first", "second"]
    distance = model.base_model.anchor_distance().detach()
    assert float(distance) < 1e-10


def test_a_saved_sparsify_adapter_and_its_checkpointed_sparsity_state_resume_the_same_walk():
    folder = FIXTURES / "saved_adapter_sparsify"
    model = load(folder)
    expected = load_file(folder / "expected.safetensors")
    model.train()
    state = json.loads((folder / "sparsity_state.json").read_text())
    model.set_sparsity_step(state["sparsity_step"])
    model.set_sparsity_metric(load_file(folder / "sparsity_metric.safetensors"))
    model.sparsity_step()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    saved = {k.removeprefix("grad/"): v for k, v in expected.items() if k.startswith("grad/")}
    assert sorted(grads) == sorted(saved)
    for name, grad in saved.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
    report = json.loads((folder / "sparsity_report.json").read_text())
    got = model.sparsity_report()
    assert (got["sparsity"], got["zeros"], got["step"]) == (report["sparsity"], report["zeros"], report["step"])
