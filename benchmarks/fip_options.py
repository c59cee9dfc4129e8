"""``--fip-option FIELD=VALUE``, shared by the benchmark scripts: the FIPConfig fields a run overrides."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from fip_peft import FIPConfig


def parse_fip_options(options: list[str], fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """``["beta=0.1", "distance=kl"]`` -> ``{"beta": 0.1, "distance": "kl"}``.

    Each VALUE is read as JSON when it parses (``0.1``, ``8``, ``null``, ``["classifier"]``), else as a string. Each
    FIELD must be a FIPConfig field, and FIPConfig must accept the values beside ``fixed`` (the fields the script
    sets itself), so that a typo or a bad value stops the run before any work instead of inside it.
    """
    known = {field.name for field in fields(FIPConfig)}
    parsed: dict[str, Any] = {}
    for option in options:
        name, sep, value = option.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise SystemExit(
                f"--fip-option: {option!r} is not FIELD=VALUE with FIELD a FIPConfig field (e.g. --fip-option "
                "beta=0.1 --fip-option distance=kl)."
            )
        try:
            parsed[name] = json.loads(value)
        except json.JSONDecodeError:
            parsed[name] = value
    try:
        FIPConfig(**{**(fixed or {}), **parsed})
    except (TypeError, ValueError) as error:
        raise SystemExit(f"--fip-option: {error}") from None
    return parsed
