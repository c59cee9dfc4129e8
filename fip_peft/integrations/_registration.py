"""Register `FIP` with PEFT: a `PeftType` member, then `peft.utils.register_peft_method`.

peft 0.21 only accepts methods that its `PeftType` enum names, so the member is added to the enum at import. This
module imports peft only when `register()` runs (`fip-peft --help` never does).
"""

from __future__ import annotations

NAME = "FIP"


def _add_peft_type_member() -> None:
    from peft.utils import PeftType

    if NAME in PeftType.__members__:
        return
    member = str.__new__(PeftType, NAME)
    member._name_ = NAME
    member._value_ = NAME
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    PeftType._member_names_.append(NAME)
    type.__setattr__(PeftType, NAME, member)


def register() -> None:
    """Make `FIP` a PEFT method (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    from .labels import install as install_labels
    from .model_card import install as install_model_card
    from .saving import install as install_safe_saving

    _add_peft_type_member()
    install_safe_saving()
    install_model_card()
    install_labels()
    if PeftType.FIP in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    from ..method.config import FIPConfig
    from ..method.model import FIPModel

    register_peft_method(name=NAME.lower(), config_cls=FIPConfig, model_cls=FIPModel, prefix="fip_")
