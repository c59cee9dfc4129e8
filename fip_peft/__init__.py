"""fip_peft: functionally invariant paths (FIP, arXiv 2205.00334) as a PEFT method.

Importing this package registers the PEFT type `FIP`, so that `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModel*` and transformers' `load_adapter` handle FIP adapters like LoRA ones.

One exception keeps the command line quick: `fip-peft --help` / `--version` (and `python -m fip_peft --help`)
answer without importing torch, transformers or peft; every command that runs registers FIP first.
"""

import importlib
import os
import sys

from . import _moved
from .integrations._registration import register

__version__ = "0.1.0"

__all__ = ["FIPConfig", "FIPLayer", "FIPModel", "FIPTrainer", "create_fip_optimizer", "__version__"]
_PUBLIC = {
    "FIPConfig": ".method.config",
    "FIPLayer": ".method.layer",
    "FIPModel": ".method.model",
    "FIPTrainer": ".integrations.trainer",
    "create_fip_optimizer": ".optimizers",
}
_HELP_FLAGS = {"-h", "--help", "--version"}
_COMMAND_MODULES = ("fip_peft", "fip_peft.apps.cli")


def _command_line_help_only() -> bool:
    """True when this process is `fip-peft ... --help` or `--version`: argparse answers and exits."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1] in _COMMAND_MODULES:
        rest = argv[argv.index("-m") + 2 :]
    elif argv and os.path.basename(sys.argv[0]) in ("fip-peft", "fip-peft.exe"):
        rest = sys.argv[1:]
    else:
        return False
    return bool(_HELP_FLAGS & set(rest))


def __getattr__(name: str):
    if name in _PUBLIC:
        register()
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module 'fip_peft' has no attribute {name!r}")


_moved.install()
if not _command_line_help_only():
    register()
    from .integrations.trainer import FIPTrainer
    from .method.config import FIPConfig
    from .method.layer import FIPLayer
    from .method.model import FIPModel
    from .optimizers import create_fip_optimizer
