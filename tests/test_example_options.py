"""The example scripts' options: named like the command line's and transformers' `TrainingArguments`, each with help,
no default printed twice."""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["continual_text", "continual_vision", "sparsify_text"]
TRAINING_ARGUMENT_FLAGS = ["--learning-rate", "--max-steps", "--per-device-train-batch-size"]


def load_script(name: str):
    """Import `examples/<name>.py` under a private name, with examples/ on the path for its `data` import."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"fip_peft_example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def help_of(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_flags_follow_training_arguments(name, capsys):
    text = help_of(name, capsys)
    for flag in TRAINING_ARGUMENT_FLAGS:
        assert flag in text


class _Built(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(name: str, monkeypatch):
    """The script's parser, caught when its `parse_args` asks it to parse."""

    def catch(parser, *args, **kwargs):
        raise _Built(parser)

    module = load_script(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Built) as built:
        module.parse_args([])
    return built.value.parser


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_help_gives_every_flag_a_help_and_each_default_once(name, monkeypatch):
    parser = parser_of(name, monkeypatch)
    formatter = parser.formatter_class(prog="x")
    for action in parser._actions:
        assert action.help, f"{name} {action.option_strings} has no help"
        shown = formatter._get_help_string(action) % {"default": action.default}
        assert len(re.findall("default", shown, flags=re.IGNORECASE)) <= 1, shown


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_help_has_no_benchmark_narrative(name, capsys):
    text = " ".join(help_of(name, capsys).split())
    assert not re.search(r"\d+(\.\d+)? points|benchmarks/|was best|collapsed", text), text
