"""The flat module paths of fip_peft 0.1 (`fip_peft.config`, `fip_peft.evaluation`, ...), kept importable.

The modules now sit in subpackages that show the architecture (`method/`, `math/`, `optimizers/`, `integrations/`,
`apps/`: see docs/architecture.md). Code written against the old paths keeps working: `import fip_peft.evaluation`
gives the module `fip_peft.apps.evaluation` itself (one module object under two names, so `isinstance` and
monkeypatching see the same thing), with a `DeprecationWarning` naming the new path. `python -m fip_peft.cli` is the
one old form that does not run: use `python -m fip_peft` or the `fip-peft` command.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    **{
        f"fip_peft.{name}": f"fip_peft.math.{name}"
        for name in ("distances", "natural", "projection", "saliency", "seeds", "sparsity")
    },
    **{
        f"fip_peft.{name}": f"fip_peft.method.{name}"
        for name in (
            "anchor_pass",
            "anchors",
            "checks",
            "config",
            "layer",
            "memory",
            "metric",
            "model",
            "model_io",
            "sparsifier",
            "step_guard",
        )
    },
    "fip_peft.distributed": "fip_peft.optimizers.distributed",
    **{
        f"fip_peft.{name}": f"fip_peft.integrations.{name}"
        for name in ("_registration", "labels", "model_card", "saving", "trainer")
    },
    **{f"fip_peft.{name}": f"fip_peft.apps.{name}" for name in ("cli", "cli_inputs", "cli_parser", "evaluation")},
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the moved module (installed on `sys.meta_path` by `import fip_peft`)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"`{spec.name}` moved to `{new}`; the old path still works but will be removed, import `{new}`.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module):
        """Nothing to run: `create_module` returned the moved module, already imported."""


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
