"""`FIPTrainer`: `transformers.Trainer` whose optimizer performs the FIP step and whose logs show D."""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..method.model_io import loss_uses_num_items
from ..optimizers.distributed import check_same_anchors, check_supported_engine
from ..optimizers.fip import _check_anchor_transform, attach_fip_step, find_fip_model
from .saving import check_saved_adapter

logger = logging.get_logger(__name__)

FIP_STATE_NAME = "fip_trainer_state.json"
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
SPARSITY_METRIC_NAME = "fip_sparsity_metric.safetensors"
PRECONDITIONER_NAME = "fip_preconditioner"


def _checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete `Trainer` checkpoint of a FIP adapter, or None. `Trainer` writes the adapter, the
    optimizer and scheduler, the RNG state, then `trainer_state.json` last, so that file being valid JSON means the
    rest was written; the adapter files are checked as a load would check them."""
    state = os.path.join(path, TRAINER_STATE_NAME)
    try:
        with open(state) as handle:
            json.load(handle)
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE_NAME} is missing or unreadable ({error})"
    try:
        check_saved_adapter(path)
    except ValueError as error:
        return str(error)
    return None


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-<step>` folder in `output_dir`."""
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.fullmatch(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return found


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that is complete (`_checkpoint_problem`), with a warning
    naming each newer incomplete one skipped; None when there is none."""
    for _, path in sorted(_checkpoint_folders(output_dir), reverse=True):
        problem = _checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(
            f"FIPTrainer: skipping the incomplete checkpoint {path} ({problem}); it was probably being written when "
            "the process was killed. Resuming from an older one."
        )
    return None


class _SkippedStepCallback(TrainerCallback):
    """Reports a step the FIP optimizer skipped (`on_nonfinite="skip"`) to accelerate as a skipped optimizer step,
    so that `Trainer` does not advance the learning-rate schedule on it, as for a step a `GradScaler` skips."""

    def __init__(self, trainer: FIPTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        fip_optimizer, wrapper = self.trainer._fip_optimizer, self.trainer.optimizer
        if fip_optimizer is None or not hasattr(wrapper, "step_was_skipped"):
            return
        # accelerate's AcceleratedOptimizer reports `step_was_skipped` from `_is_overflow`, which only its GradScaler
        # path sets: keep a scaler overflow, add the FIP skip
        overflow = wrapper.scaler is not None and wrapper._is_overflow
        wrapper._is_overflow = overflow or fip_optimizer.fip_step_was_skipped


class FIPTrainer(Trainer):
    """A `Trainer` for FIP models: the optimizer it builds (from `args.optim`, or the one passed in `optimizers`)
    performs the FIP step, and every log line carries `fip_distance`, the mean functional distance D on anchors
    since the last log, beside the task `loss`.

    The task gradient is that of the mean loss over the whole batch (all processes, all accumulation steps), so that
    `beta` weighs it against D the same way on any number of processes. Checkpoints also hold each adapter's
    anchor sampling position (`fip_trainer_state.json`), so that `train(resume_from_checkpoint=...)` continues the
    same sequence of anchor batches.

    `anchor_transform`: augments the anchors afresh at every step (see `create_fip_optimizer`).
    """

    def __init__(self, model=None, *args, anchor_transform=None, **kwargs) -> None:
        if model is not None:
            find_fip_model(model)
        _check_anchor_transform(anchor_transform)
        self.anchor_transform = anchor_transform
        super().__init__(model, *args, **kwargs)
        check_supported_engine(self.accelerator.distributed_type)
        check_same_anchors(find_fip_model(self.model))  # before DDP broadcasts buffers of different sizes
        self.add_callback(_SkippedStepCallback(self))
        if self.model_accepts_loss_kwargs and self.compute_loss_func is None and not loss_uses_num_items(self.model):
            # Trainer would skip dividing this mean loss by the accumulation steps and multiply it by the number of
            # processes, as if the model had summed it over the global batch: the task gradient would grow with
            # both while D / beta does not.
            self.model_accepts_loss_kwargs = False

    _fip_optimizer = None
    # read by the FIP optimizer's `check_trainer`, which refuses a plain `Trainer` where this one corrects the loss
    fip_averages_task_loss = True

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; with `resume_from_checkpoint=True`, from the newest *complete* checkpoint in
        `args.output_dir` (`newest_complete_checkpoint`): a process killed while `Trainer` wrote a checkpoint leaves
        `checkpoint-N/` empty or partial, from which `Trainer` would fail to resume."""
        if resume_from_checkpoint is True and os.path.isdir(self.args.output_dir):
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None and _checkpoint_folders(self.args.output_dir):
                logger.warning(
                    f"FIPTrainer: no complete checkpoint in {self.args.output_dir} (the run was killed while writing "
                    "its first one); training starts from the beginning."
                )
            elif resume_from_checkpoint is None:
                resume_from_checkpoint = True  # nothing at all: Trainer's own error
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss; zero, without a forward pass, for a batch without labels when the adapter sparsifies
        (`objective="sparsify"`): the step then only keeps the anchors' outputs and pulls toward the sparse
        weights."""
        if not return_outputs and self._sparsifies_without_labels(inputs):
            return torch.zeros((), device=self.args.device, requires_grad=True)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _sparsifies_without_labels(self, inputs) -> bool:
        if any(name in inputs for name in self.label_names or ("labels",)):
            return False
        fip_model = find_fip_model(self.model)
        return fip_model.active_config.objective == "sparsify"

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self._fip_optimizer = attach_fip_step(optimizer, self.model, self.anchor_transform)
        if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            self._fip_optimizer.fip_max_grad_norm = self.args.max_grad_norm
        return optimizer

    # Private override (pinned by tests/test_trainer_overrides.py): Trainer clips between the backward and the step,
    # where no callback runs, and clipping must wait for the anchor gradient inside the FIP step.
    def _clip_grad_norm(self, model):
        """Return the task gradient's norm for the logs without clipping it: the FIP step clips the combined
        gradient (task loss + D / beta) to `args.max_grad_norm` after adding the anchor gradient."""
        if self._fip_optimizer is None or self._fip_optimizer.fip_max_grad_norm is None:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(model.parameters(), float("inf"))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._fip_optimizer is not None:
            distance = self._fip_optimizer.pop_mean_distance()
            if distance is not None:
                logs["fip_distance"] = round(distance, 6)
        super().log(logs, *args, **kwargs)

    # Private override (pinned by tests/test_trainer_overrides.py): the FIP state must be in the checkpoint folder
    # before trainer_state.json marks it complete and be restored by default; `ExportableState` is JSON in that file,
    # restored only with `restore_callback_states_from_checkpoint=True`, and `on_save` runs after it is written.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            fip_model = find_fip_model(self.model)
            state = {
                name: {"anchors": len(memory), "sample_step": int(memory.sample_step)}
                for name, memory in fip_model.fip_memory.items()
            }
            metric = {}
            for name, config in fip_model.peft_config.items():
                if config.objective == "sparsify" and name in state:
                    state[name]["sparsity_step"] = fip_model.get_sparsity_step(name)
                    metric |= {f"{name}/{key}": t for key, t in fip_model.get_sparsity_metric(name).items()}
            with open(os.path.join(output_dir, FIP_STATE_NAME), "w") as handle:
                json.dump(state, handle, indent=2)
            if metric:
                save_file(
                    {key: t.contiguous().cpu() for key, t in metric.items()},
                    os.path.join(output_dir, SPARSITY_METRIC_NAME),
                )
            preconditioner = getattr(self._fip_optimizer, "_fip_preconditioner", None)
            if preconditioner is not None:  # the natural solvers' metric and its refresh counters
                info, tensors = preconditioner.state()
                save_file(tensors, os.path.join(output_dir, PRECONDITIONER_NAME + ".safetensors"))
                with open(os.path.join(output_dir, PRECONDITIONER_NAME + ".json"), "w") as handle:
                    json.dump(info, handle)

    # Private override (pinned by tests/test_trainer_overrides.py): no callback is told the checkpoint it resumes
    # from, and the natural solver's state needs the optimizer, which exists here.
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, FIP_STATE_NAME) if checkpoint else None
        if path is None or not os.path.isfile(path):
            return
        with open(path) as handle:
            state = json.load(handle)
        fip_model = find_fip_model(self.model)
        for name, saved in state.items():
            if name not in fip_model.fip_memory:
                continue
            memory = fip_model.fip_memory[name]
            if len(memory) != saved["anchors"]:
                raise ValueError(
                    f"The checkpoint {checkpoint} was trained with {saved['anchors']} anchors in FIP adapter "
                    f"{name!r}, but the model now holds {len(memory)}. With FIPConfig(save_anchors=False) the anchors "
                    "are not in the checkpoint: call `model.remember(...)` with the same data on the base model "
                    "before resuming, or train with save_anchors=True."
                )
            memory.sample_step.fill_(saved["sample_step"])
            if "sparsity_step" in saved:
                fip_model.set_sparsity_step(saved["sparsity_step"], name)
        self._load_preconditioner(checkpoint)
        metric_path = os.path.join(checkpoint, SPARSITY_METRIC_NAME)
        if os.path.isfile(metric_path):
            metric = load_file(metric_path)
            for name in {key.split("/", 1)[0] for key in metric} & set(fip_model.peft_config):
                prefix = f"{name}/"
                fip_model.set_sparsity_metric(
                    {key.removeprefix(prefix): t for key, t in metric.items() if key.startswith(prefix)}, name
                )

    def _load_preconditioner(self, checkpoint: str) -> None:
        """Restore the natural solvers' metric and refresh counters from `checkpoint`, so that the resumed run
        refreshes the metric at the same steps, on the same anchors, as the uninterrupted one."""
        path = os.path.join(checkpoint, PRECONDITIONER_NAME)
        if self._fip_optimizer is None or not os.path.isfile(path + ".json"):
            return
        with open(path + ".json") as handle:
            info = json.load(handle)
        preconditioner = self._fip_optimizer._preconditioner()
        if preconditioner is None or preconditioner.adapter != info["adapter"]:
            return
        preconditioner.load_state(info, load_file(path + ".safetensors"), self._fip_optimizer)
