"""fip_peft: functionally invariant paths (FIP, arXiv 2205.00334) as a PEFT method.

Importing this package registers the PEFT type `FIP`, so that `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModel*` and transformers' `load_adapter` handle FIP adapters like LoRA ones.
"""

from ._registration import register
from .config import FIPConfig
from .layer import FIPLayer
from .model import FIPModel
from .optimizers import create_fip_optimizer
from .trainer import FIPTrainer

register()

__version__ = "0.1.0"

__all__ = [
    "FIPConfig",
    "FIPLayer",
    "FIPModel",
    "FIPTrainer",
    "create_fip_optimizer",
    "__version__",
]
