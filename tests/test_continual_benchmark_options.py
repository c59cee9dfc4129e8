"""The continual benchmark's sweep options: FIPConfig overrides, held-out scoring and steps per task."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from continual import parse_args, parse_fip_set  # noqa: E402


def test_fip_set_reads_each_value_as_a_python_literal_or_a_string():
    overrides = parse_fip_set("damping=1.0, metric_positions=8,solver=natural,beta=None")

    assert overrides == {"damping": 1.0, "metric_positions": 8, "solver": "natural", "beta": None}


def test_fip_set_names_the_option_when_a_key_is_not_a_fipconfig_field():
    with pytest.raises(SystemExit, match="--fip-set: 'dampng=1' is not KEY=VALUE with KEY a FIPConfig field"):
        parse_fip_set("dampng=1")


def test_fip_set_passes_on_fipconfig_s_own_check_of_a_value():
    with pytest.raises(SystemExit, match="--fip-set: .*damping must be > 0"):
        parse_fip_set("damping=-1")


def test_fip_set_overrides_reach_the_parsed_arguments():
    assert parse_args(["--suite", "text", "--fip-set", "damping=0.3"]).fip_overrides == {"damping": 0.3}


def test_validation_is_refused_for_the_vision_suite():
    with pytest.raises(SystemExit, match="--validation: takes a positive count with --suite text"):
        parse_args(["--suite", "vision", "--validation", "10"])


@pytest.mark.parametrize("count", ["0", "-3"])
def test_steps_must_be_a_positive_count(count):
    with pytest.raises(SystemExit, match="--steps: takes a positive number"):
        parse_args(["--suite", "text", "--steps", count])
