"""The README's test command, `make test`, installs everything the tests read (so no test skips on a fresh machine)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def installed_venv(tmp_path):
    """A venv folder whose install stamp is newer than pyproject.toml: make has nothing to do for the venv."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    return venv


def dry_run(target: str, **variables: str) -> str:
    make = shutil.which("make")
    assert make is not None, "the README's commands need `make`"
    argv = [make, "-n", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_make_test_installs_fashion_mnist_from_debian_when_it_is_missing(installed_venv, tmp_path):
    missing = tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    commands = dry_run("test", VENV=str(installed_venv), FASHION_MNIST=str(missing))
    assert "apt-get install -y -q dataset-fashion-mnist" in commands
    assert commands.index("dataset-fashion-mnist") < commands.index("-m pytest")


def test_make_test_unpacks_the_reuters_files_of_debians_weka_package_when_they_are_missing(installed_venv, tmp_path):
    commands = dry_run("test", VENV=str(installed_venv), WEKA_EXAMPLES_DIR=str(tmp_path / "weka"))
    assert "apt-get download -q weka" in commands and "dpkg-deb -x" in commands
    assert commands.index("Reuters*.arff") < commands.index("-m pytest")


def test_make_test_leaves_installed_data_alone(installed_venv, tmp_path):
    present = tmp_path / "t10k-images-idx3-ubyte.gz"
    present.touch()
    (tmp_path / "ReutersGrain-train.arff").touch()
    variables = {"FASHION_MNIST": str(present), "WEKA_EXAMPLES_DIR": str(tmp_path)}
    commands = dry_run("test", VENV=str(installed_venv), **variables)
    assert "apt-get" not in commands and "-m pytest" in commands
