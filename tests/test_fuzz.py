"""Property-based tests: any `FIPConfig` and any `remember` input either works or raises `ValueError`/`TypeError`.

Each strategy draws a field's value from a list where every value is tagged valid or not, so the tests know which
outcome to expect: a valid configuration trains one FIP step, an invalid one raises `ValueError`/`TypeError` (never
another exception) before a model is touched.
"""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

import fip_peft
from tests._tasks import MLP, NUM_CLASSES, tiny_bert

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = tiny_bert().config.vocab_size
LAYERS = ("fc1", "fc2", "head")

# Each entry: (value, valid). None in a valid slot means "leave the default".
FIELDS = {
    "beta": [(None, True), (0.3, True), (2, True), (0.0, False), (-1.0, False), (math.inf, False), (math.nan, False),
             ("0.4", False), (True, False)],
    "rank": [(None, True), (1, True), (4, True), (100, True), (0, False), (-2, False), (2.0, False), ("4", False)],
    "distance": [("logits", True), ("bhattacharyya", True), ("kl", True), ("cosine", False), (None, False)],
    "anchor_budget": [(1, True), (7, True), (64, True), (0, False), (-5, False), (8.0, False), (None, False)],
    "anchor_batch_size": [(1, True), (5, True), (500, True), (0, False), ("16", False)],
    "anchor_seed": [(0, True), (123, True), (-1, False), (1.5, False)],
    "save_anchors": [(True, True), (False, True), ("yes", False), (1, False)],
    "init_weights": [(True, True), (False, True), ("no", False), (None, False)],
    "on_nonfinite": [("skip", True), ("raise", True), ("ignore", False), (None, False)],
    "max_consecutive_skips": [(None, True), (1, True), (50, True), (0, False), (2.5, False), (True, False)],
    "objective": [("continual", True), ("prune", False), (3, False)],
    "solver": [("penalty", True), ("magic", False)],
    "target_modules": [(["fc1"], True), (["fc1", "fc2"], True), ("fc.", True), ("all-linear", True),
                       (["nothing"], False), ([], False), (3, False), (["fc1", 2], False), ({"fc1": 1}, False)],
    "modules_to_save": [(None, True), (["head"], True), ("head", False), ([1], False)],
}  # fmt: skip


def _choices(name: str, valid: bool | None = None):
    return st.sampled_from([c for c in FIELDS[name] if valid is None or c[1] == valid])


@st.composite
def one_invalid_field(draw):
    wrong = draw(st.sampled_from(sorted(FIELDS)))
    return {name: draw(_choices(name, valid=name != wrong)) for name in FIELDS}


def field_values():
    """A third all-valid configurations, a third with one invalid field, a third anything."""
    return st.one_of(
        st.fixed_dictionaries({name: _choices(name, valid=True) for name in FIELDS}),
        one_invalid_field(),
        st.fixed_dictionaries({name: _choices(name) for name in FIELDS}),
    )


def expected_valid(drawn: dict) -> bool:
    if not all(valid for _, valid in drawn.values()):
        return False
    targets, saved = drawn["target_modules"][0], drawn["modules_to_save"][0]
    return not (isinstance(targets, list) and saved and set(targets) & set(saved))


def one_fip_step(model: nn.Module) -> None:
    data = torch.rand(40, 64) * 16
    model.remember(data)
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=0.01)
    model.train()
    nn.functional.cross_entropy(model(data[:8]), torch.arange(8) % NUM_CLASSES).backward()
    optimizer.step()


@FUZZ
@given(drawn=field_values())
def test_any_config_trains_one_step_or_raises_value_or_type_error(drawn):
    kwargs = {name: value for name, (value, _) in drawn.items() if not (name in ("beta", "rank") and value is None)}
    valid = expected_valid(drawn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a rank above a layer's rank warns
        if valid:
            one_fip_step(get_peft_model(MLP(), fip_peft.FIPConfig(**kwargs)))
            return
        base = MLP()
        with pytest.raises((ValueError, TypeError)):
            get_peft_model(base, fip_peft.FIPConfig(**kwargs))
    assert not any(isinstance(m, fip_peft.FIPLayer) for m in base.modules())


@st.composite
def tensor_anchors(draw):
    """A tensor for the MLP: right or wrong width or row count, any dtype (the MLP divides its input by 16.0, so
    integer and float64 pixels run), maybe NaN/inf values."""
    rows = draw(st.integers(0, 6))
    width = draw(st.sampled_from([64, 64, 63, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64]))
    values = (torch.rand(rows, width) * 16).to(dtype)
    poison = draw(st.sampled_from([None, None, math.nan, math.inf]))
    if poison is not None and rows and dtype.is_floating_point:
        values[:, draw(st.integers(0, width - 1))] = poison  # every row, whichever rows are kept
    valid = rows >= 1 and width == 64 and (poison is None or not dtype.is_floating_point)
    return values, valid


NUM_ANCHORS = [(None, True), (1, True), (3, True), (0, False), (9, False), (2.5, False), (True, False)]


@FUZZ
@given(anchors=tensor_anchors(), num_anchors=st.sampled_from(NUM_ANCHORS))
def test_any_tensor_anchors_are_remembered_or_refused_with_value_or_type_error(anchors, num_anchors):
    (values, valid_anchors), (count, valid_count) = anchors, num_anchors
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1"], anchor_budget=8))
    if valid_anchors and valid_count:
        summary = model.remember(values, num_anchors=count)
        assert 1 <= summary["total"] <= 8
        return
    with pytest.raises((ValueError, TypeError)):
        model.remember(values, num_anchors=count)
    assert len(model.base_model.memory()) == 0


@st.composite
def token_anchors(draw):
    """A dict of token ids for the tiny BERT: ids inside or outside its vocabulary, integer or float, with or without
    an attention mask, maybe a label column."""
    rows, length = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    high = draw(st.sampled_from([VOCAB, VOCAB, VOCAB + 1, 10 * VOCAB]))
    ids = torch.randint(0, high, (rows, length))
    low_id = draw(st.sampled_from([0, 0, -1]))
    ids[0, 0] = low_id
    as_float = draw(st.booleans()) and draw(st.booleans())
    batch = {"input_ids": ids.float() if as_float else ids}
    if draw(st.booleans()):
        batch["attention_mask"] = torch.ones(rows, length, dtype=torch.long)
    if draw(st.booleans()):
        batch["labels"] = torch.zeros(rows, dtype=torch.long)
    valid = int(ids.max()) < VOCAB and low_id >= 0 and not as_float
    return batch, valid


@FUZZ
@given(anchors=token_anchors())
def test_any_token_anchors_are_remembered_or_refused_with_value_or_type_error(anchors):
    batch, valid = anchors
    model = get_peft_model(tiny_bert(), fip_peft.FIPConfig(task_type="SEQ_CLS", anchor_budget=4))
    if valid:
        assert model.remember(batch)["total"] == batch["input_ids"].shape[0]
        return
    with pytest.raises((ValueError, TypeError)):
        model.remember(batch)
    assert len(model.base_model.memory()) == 0
