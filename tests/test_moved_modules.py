"""fip_peft 0.1's flat module paths (`fip_peft.config`, `fip_peft.evaluation`, ...) keep working after the modules
moved into subpackages: each old path is the moved module itself, with a DeprecationWarning naming the new path."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fip_peft._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_old_module_path_is_the_moved_module_and_warns_with_the_new_path():
    code = f"""
import importlib, json, warnings
import fip_peft
result = {{}}
for old, new in {MOVED!r}.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    result[old] = [module is importlib.import_module(new), any(new in m for m in messages)]
print(json.dumps(result))
"""
    result = json.loads(run_fresh(code).splitlines()[-1])
    assert set(result) == set(MOVED)
    assert all(same for same, _ in result.values()), [old for old, (same, _) in result.items() if not same]
    assert all(warned for _, warned in result.values()), [old for old, (_, warned) in result.items() if not warned]


def test_old_from_imports_give_the_same_classes_as_the_new_paths():
    code = """
import warnings
warnings.simplefilter("ignore", DeprecationWarning)
from fip_peft.evaluation import AccuracyMatrix, evaluate_tasks
from fip_peft.sparsity import recommended_recipe
from fip_peft.config import FIPConfig
import fip_peft
from fip_peft.apps import evaluation
from fip_peft.math import sparsity
from fip_peft.method.accuracy import AccuracyMatrix as Moved
print(AccuracyMatrix is Moved, evaluate_tasks is evaluation.evaluate_tasks,
      recommended_recipe is sparsity.recommended_recipe, FIPConfig is fip_peft.FIPConfig)
"""
    assert run_fresh(code).split() == ["True"] * 4


def test_the_new_paths_import_without_any_deprecation_warning():
    code = """
import importlib, warnings
warnings.filterwarnings("error", message=".*moved to `fip_peft", category=DeprecationWarning)
import fip_peft
from fip_peft._moved import MOVED
for new in MOVED.values():
    importlib.import_module(new)
print("ok")
"""
    assert run_fresh(code).strip().endswith("ok")
