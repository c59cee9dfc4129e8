"""`import fip_peft` makes FIP a PEFT method like LoRA."""

import peft
from peft import PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import fip_peft
from fip_peft.integrations._registration import register
from tests._tasks import MLP


def test_import_adds_the_fip_peft_type():
    assert PeftType("FIP") is PeftType.FIP
    assert "FIP" in [t.value for t in PeftType]


def test_import_registers_config_and_tuner():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.FIP] is fip_peft.FIPConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.FIP] is fip_peft.FIPModel


def test_registering_twice_is_harmless():
    register()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.FIP] is fip_peft.FIPModel


def test_get_peft_model_returns_a_peft_model_around_an_fip_model():
    model = get_peft_model(MLP(), fip_peft.FIPConfig(target_modules=["fc1"]))
    assert isinstance(model, PeftModel)
    assert isinstance(model.base_model, fip_peft.FIPModel)
    assert peft.get_peft_model_state_dict(model)
