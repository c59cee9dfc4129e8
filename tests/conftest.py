"""Shared test setup: fail fast on any Hub access and seed torch for every test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from functools import cache  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._tasks import digits_tasks  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@cache
def _digits_once() -> dict[str, torch.Tensor]:
    return digits_tasks()


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """The digits tasks (see `digits_tasks`), loaded once per session; each test module gets its own copy."""
    return {name: tensor.clone() for name, tensor in _digits_once().items()}
