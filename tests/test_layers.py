"""FIP layers hold a weight displacement: zero at start, exact when disabled, exact when merged."""

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import fip_peft


class Zoo(nn.Module):
    """One of each layer type FIP adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.lin = nn.Linear(8 + 4 * 4 * 4, 6)
        self.c1d = Conv1D(5, 6)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.emb(ids).mean(1), self.conv(image).flatten(1)], dim=1)
        return self.c1d(self.lin(x))


TARGETS = ["emb", "conv", "lin", "c1d"]


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "ids": torch.randint(0, 20, (3, 7), generator=generator),
        "image": torch.randn(3, 1, 4, 4, generator=generator),
    }


def wrapped(rank=None, init_weights=True) -> tuple[nn.Module, nn.Module]:
    base = Zoo()
    expected = Zoo()
    expected.load_state_dict(base.state_dict())
    model = get_peft_model(base, fip_peft.FIPConfig(target_modules=TARGETS, rank=rank, init_weights=init_weights))
    return model, expected


@pytest.mark.parametrize("rank", [None, 2])
def test_zero_initialised_adapter_keeps_the_base_function(rank):
    model, base = wrapped(rank)
    torch.testing.assert_close(model(**inputs()), base(**inputs()), atol=0, rtol=0)


@pytest.mark.parametrize("rank", [None, 2])
def test_every_layer_type_is_wrapped(rank):
    model, _ = wrapped(rank)
    wrapped_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, fip_peft.FIPLayer)}
    assert wrapped_names == set(TARGETS)


@pytest.mark.parametrize("rank", [None, 2])
def test_adapter_changes_the_output_when_nonzero(rank):
    model, base = wrapped(rank, init_weights=False)
    assert not torch.allclose(model(**inputs()), base(**inputs()), atol=1e-4)


@pytest.mark.parametrize("rank", [None, 2])
def test_disable_adapter_gives_back_the_base_function_exactly(rank):
    model, base = wrapped(rank, init_weights=False)
    with model.disable_adapter():
        torch.testing.assert_close(model(**inputs()), base(**inputs()), atol=0, rtol=0)


@pytest.mark.parametrize("rank", [None, 2])
def test_merge_and_unload_returns_a_plain_model_with_the_same_outputs(rank):
    model, _ = wrapped(rank, init_weights=False)
    adapted = model(**inputs()).detach()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, fip_peft.FIPLayer) for m in merged.modules())
    assert type(merged.lin) is nn.Linear and type(merged.c1d) is Conv1D
    torch.testing.assert_close(merged(**inputs()), adapted, atol=1e-5, rtol=1e-5)


def test_unload_returns_the_base_model_untouched():
    model, base = wrapped(init_weights=False)
    plain = model.unload()
    torch.testing.assert_close(plain(**inputs()), base(**inputs()), atol=0, rtol=0)


def test_merge_then_unmerge_restores_the_adapted_function():
    model, _ = wrapped(init_weights=False)
    adapted = model(**inputs()).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(**inputs()), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(**inputs()), adapted, atol=1e-5, rtol=1e-5)


def test_low_rank_displacement_is_b_times_a_with_b_zero_at_start():
    model, _ = wrapped(rank=2)
    layer = model.base_model.model.lin
    assert torch.count_nonzero(layer.fip_B["default"]) == 0
    assert layer.fip_A["default"].shape == (2, layer.get_base_layer().in_features)
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_matches_float32(dtype):
    base = Zoo()
    model = get_peft_model(base, fip_peft.FIPConfig(target_modules=["lin", "c1d"], init_weights=False))
    expected = model(**inputs()).detach()
    model = model.to(dtype)
    x = inputs()
    x["image"] = x["image"].to(dtype)
    out = model(**x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_merge_and_unload_puts_back_a_module_to_save_that_has_children():
    """What `fip-peft train` builds by default: the BERT pooler (a module with a child, no weight of its own) trained
    in full as `modules_to_save`, next to the head. Merging gives a plain model with the trained copies in place."""
    from tests._tasks import tiny_bert

    config = fip_peft.FIPConfig(
        target_modules=["query", "value"],
        exclude_modules=["bert.pooler.dense"],
        modules_to_save=["bert.pooler", "classifier"],
        init_weights=False,
    )
    model = get_peft_model(tiny_bert(), config)
    pooler = model.base_model.model.bert.pooler.modules_to_save["default"]
    with torch.no_grad():
        pooler.dense.weight.add_(0.5)
    ids = torch.randint(0, 50, (3, 9))
    adapted = model(input_ids=ids).logits.detach()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (fip_peft.FIPLayer, nn.ModuleDict)) for m in merged.modules())
    assert type(merged.bert.pooler).__name__ == "BertPooler" and type(merged.classifier) is nn.Linear
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
