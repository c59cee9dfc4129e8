"""Optimizer factories for FIP, one per file as in `peft.optimizers`."""

from .fip import FIPStepMixin, attach_fip_step, create_fip_optimizer, find_fip_model

__all__ = ["FIPStepMixin", "attach_fip_step", "create_fip_optimizer", "find_fip_model"]
