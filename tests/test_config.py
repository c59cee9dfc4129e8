"""FIPConfig validates its fields and names the field in every error."""

import pytest
from peft import PeftConfig, PeftType

import fip_peft


def test_defaults_are_the_documented_ones():
    config = fip_peft.FIPConfig()
    assert config.peft_type == PeftType.FIP
    assert (config.objective, config.distance, config.rank, config.save_anchors) == ("continual", "logits", None, True)
    assert config.beta > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"beta": 0}, ValueError, "beta"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"beta": "big"}, TypeError, "beta"),
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.5}, TypeError, "rank"),
        ({"distance": "cosine"}, ValueError, "distance"),
        ({"objective": "prune"}, ValueError, "objective"),
        ({"objective": "sparsify"}, ValueError, "target_sparsity"),
        ({"anchor_budget": 0}, ValueError, "anchor_budget"),
        ({"anchor_batch_size": 0}, ValueError, "anchor_batch_size"),
        ({"solver": "magic"}, ValueError, "solver"),
        ({"save_anchors": "yes"}, TypeError, "save_anchors"),
    ],
)
def test_bad_field_raises_an_error_naming_it(kwargs, error, field):
    with pytest.raises(error, match=field):
        fip_peft.FIPConfig(**kwargs)


def test_config_round_trips_through_save_and_peft_config_from_pretrained(tmp_path):
    config = fip_peft.FIPConfig(target_modules=["fc1"], rank=4, beta=0.7, distance="kl", anchor_budget=64)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, fip_peft.FIPConfig)
    assert (loaded.rank, loaded.beta, loaded.distance, loaded.anchor_budget) == (4, 0.7, "kl", 64)
    assert loaded.target_modules == {"fc1"}
