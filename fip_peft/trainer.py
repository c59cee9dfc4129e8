"""`FIPTrainer`: `transformers.Trainer` whose optimizer performs the FIP step and whose logs show D."""

from __future__ import annotations

from transformers import Trainer

from .optimizers.fip import attach_fip_step, find_fip_model


class FIPTrainer(Trainer):
    """A `Trainer` for FIP models: the optimizer it builds (from `args.optim`, or the one passed in `optimizers`)
    performs the FIP step, and every log line carries `fip_distance`, the mean functional distance D on anchors
    since the last log, beside the task `loss`."""

    def __init__(self, model=None, *args, **kwargs) -> None:
        if model is not None:
            find_fip_model(model)
        super().__init__(model, *args, **kwargs)

    _fip_optimizer = None

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self._fip_optimizer = attach_fip_step(optimizer, self.model)
        return optimizer

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._fip_optimizer is not None:
            distance = self._fip_optimizer.pop_mean_distance()
            if distance is not None:
                logs["fip_distance"] = round(distance, 6)
        super().log(logs, *args, **kwargs)
