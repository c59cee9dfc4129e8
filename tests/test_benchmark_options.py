"""The benchmarks' sweep options: FIPConfig overrides (shared); held-out scoring, steps per task, learning rate
and AdamW's eps (continual); and the sparsify example's refusal of a criterion its scope cannot take."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from continual import parse_args, suite_sizes  # noqa: E402
from fip_options import parse_fip_options  # noqa: E402


def test_fip_option_reads_each_value_as_json_or_else_as_a_string():
    options = ["damping=1.0", "metric_positions=8", "solver=natural+penalty", "beta=null", 'modules_to_save=["head"]']

    assert parse_fip_options(options) == {
        "damping": 1.0,
        "metric_positions": 8,
        "solver": "natural+penalty",
        "beta": None,
        "modules_to_save": ["head"],
    }


def test_fip_option_names_the_option_when_a_field_is_not_a_fipconfig_field():
    with pytest.raises(SystemExit, match="--fip-option: 'dampng=1' is not FIELD=VALUE with FIELD a FIPConfig field"):
        parse_fip_options(["dampng=1"])


def test_fip_option_passes_on_fipconfig_s_own_check_of_a_value():
    with pytest.raises(SystemExit, match="--fip-option: .*damping must be > 0"):
        parse_fip_options(["damping=-1"])


def test_fip_option_values_are_checked_beside_the_fields_the_script_sets():
    with pytest.raises(SystemExit, match="--fip-option: .*sparsity"):
        parse_fip_options(["sparsity_scope=row"], fixed={"objective": "sparsify", "target_sparsity": 0.8})


def test_continual_refuses_a_bad_fip_option_value_before_any_work():
    with pytest.raises(SystemExit, match="--fip-option: .*damping must be > 0"):
        parse_args(["--suite", "text", "--fip-option", "damping=-1"])


def test_continual_fip_options_reach_the_parsed_arguments():
    parsed = parse_args(["--suite", "text", "--fip-option", "damping=0.3", "--fip-option", "metric_anchors=64"])

    assert parsed.fip_options == {"damping": 0.3, "metric_anchors": 64}


def test_validation_is_refused_for_both_suites_at_once():
    with pytest.raises(SystemExit, match="--validation: takes a positive count with one --suite"):
        parse_args(["--suite", "all", "--validation", "10"])


def test_vision_validation_scores_on_training_images_the_methods_never_train_on():
    from continual import build_suite

    plain = build_suite("vision", True, 0)
    held_out = build_suite("vision", True, 0, validation=20)
    # the same training rows as without validation, and 20 further ones per task to score on
    for task in range(len(plain.task_names)):
        rows = [(task, i) for i in range(plain.train_sizes[task])]
        assert torch.equal(plain.collate(rows)[0]["x"], held_out.collate(rows)[0]["x"])
        scored = held_out.test_batches[task][0][0]["x"]
        assert scored.shape[0] == 20
        trained = held_out.collate(rows)[0]["x"]
        assert not {r.numpy().tobytes() for r in scored.flatten(1)} & {r.numpy().tobytes() for r in trained.flatten(1)}


@pytest.mark.parametrize("count", ["0", "-3"])
def test_steps_must_be_a_positive_count(count):
    with pytest.raises(SystemExit, match="--steps: takes a positive number"):
        parse_args(["--suite", "text", "--steps", count])


@pytest.mark.parametrize("lr", ["0", "-1e-4"])
def test_lr_must_be_positive(lr):
    with pytest.raises(SystemExit, match="--lr: takes a positive learning rate"):
        parse_args(["--suite", "text", f"--lr={lr}"])


def test_lr_replaces_the_suite_s_learning_rate_and_keeps_its_other_sizes():
    sizes = suite_sizes("text", quick=False, steps=18, lr=3e-4)

    assert (sizes.lr, sizes.steps) == (3e-4, 18)
    assert sizes.batch_size == suite_sizes("text", quick=False).batch_size


@pytest.mark.parametrize("eps", ["0", "-1e-8"])
def test_adam_eps_must_be_positive(eps):
    with pytest.raises(SystemExit, match="--adam-eps: takes a positive number"):
        parse_args(["--suite", "vision", f"--adam-eps={eps}"])


def test_adam_eps_replaces_adamw_s_default_and_keeps_the_suite_s_learning_rate():
    sizes = suite_sizes("vision", quick=False, adam_eps=1e-3)

    assert (sizes.adam_eps, sizes.lr) == (1e-3, suite_sizes("vision", quick=False).lr)
    assert suite_sizes("vision", quick=False).adam_eps == 1e-8


def test_sparsify_example_refuses_obs_with_a_global_threshold_before_any_work():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from sparsify_text import parse_args as example_args

    with pytest.raises(SystemExit):
        example_args(["--sparsity-criterion", "obs", "--sparsity-scope", "global"])
    assert example_args(["--sparsity-criterion", "obs", "--sparsity-scope", "layer"]).sparsity_scope == "layer"
    assert example_args(["--sparsity-criterion", "obs"]).sparsity_scope is None  # resolved by FIPConfig: "layer"
