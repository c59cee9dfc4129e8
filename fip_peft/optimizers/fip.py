"""`create_fip_optimizer`: an optimizer whose `step()` is the FIP step.

`step()` adds the gradient of the functional distance, (1 / beta) * grad D(w, w_ref) on a batch of remembered
anchors, to the gradient of the secondary objective already in `.grad`, then lets the wrapped optimizer move the
weights. A plain loop `loss.backward(); optimizer.step()` therefore follows the functionally invariant path with
no other call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache

import torch
from torch import nn
from transformers.utils import logging

from ..method.checks import NonFiniteStepError, is_number
from ..method.model import FIPModel
from ..method.model_io import loss_uses_num_items
from .distributed import all_processes, anchor_forward, check_same_anchors, local_tensor
from .preconditioner import MetricPreconditioner
from .projection import OutputProjector

logger = logging.get_logger(__name__)


def find_fip_model(model: nn.Module) -> FIPModel:
    """The `FIPModel` inside `model` (a `PeftModel`, the `FIPModel` itself, or any wrapper holding one)."""
    if isinstance(model, FIPModel):
        return model
    found = next((m for m in model.modules() if isinstance(m, FIPModel)), None)
    if found is None:
        raise TypeError(
            f"{type(model).__name__} has no FIP adapter; wrap it first with "
            "`peft.get_peft_model(model, fip_peft.FIPConfig(...))`."
        )
    return found


class FIPStepMixin:
    """Turns any `torch.optim.Optimizer` subclass into one whose `step()` performs the FIP step."""

    _fip_model: FIPModel

    def _attach_fip(self, fip_model: FIPModel, root: nn.Module | None = None) -> None:
        self._fip_model = fip_model
        self._fip_root = root
        self._fip_anchor_forward = None
        self.fip_anchor_transform = getattr(self, "fip_anchor_transform", None)
        self.fip_distance_sum = 0.0
        self.fip_distance_count = 0
        self.fip_steps = 0
        self.fip_step_was_skipped = False
        self.fip_consecutive_skips = 0
        self.fip_max_grad_norm = getattr(self, "fip_max_grad_norm", None)
        self.fip_anchor_step = 0
        self._fip_anchor_cache = None
        if not getattr(self, "_fip_interval_hooks", False):  # the lazy pass's counter and gradient, checkpointed
            self.register_state_dict_post_hook(_save_anchor_interval_state)
            self.register_load_state_dict_pre_hook(_load_anchor_interval_state)
            self._fip_interval_hooks = True
        fip_model._register_fip_optimizer(self)

    def add_anchor_gradient(self) -> torch.Tensor | None:
        """Accumulate (1 / beta) * grad D, plus `label_weight` times the gradient of the labelled anchors'
        cross-entropy, into `.grad`; return D (a tensor, so that no step waits on the device), or None when nothing
        is remembered, the solver is `"natural"` (no D in its step) or `FIPConfig.anchor_interval` skips the pass at
        this step (`_add_lazy_anchor_gradient`)."""
        fip_model = self._fip_model
        config = fip_model.active_config
        if config.solver in ("natural", "projection"):
            return None
        if config.anchor_interval > 1:
            return self._add_lazy_anchor_gradient(config)
        with torch.enable_grad():
            found = self._anchor_objective(config)
            if found is None:
                return None
            objective, distance = found
            objective.backward()
        return self._record_distance(distance)

    def _anchor_objective(self, config) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(1 / beta) D + label_weight * CE on the next anchor batch, and D; None when nothing is remembered."""
        terms = self._fip_model.anchor_terms(forward=self._fip_anchor_forward, transform=self.fip_anchor_transform)
        if terms is None:
            return None
        distance, label_loss = terms
        objective = distance / config.beta
        if label_loss is not None:
            objective = objective + config.label_weight * label_loss
        return objective, distance

    def _add_lazy_anchor_gradient(self, config) -> torch.Tensor | None:
        """`FIPConfig.anchor_interval` k > 1: the anchor pass at every k-th step of this optimizer (counted by
        `fip_anchor_step`, which a skipped step leaves as it was). `"reuse"`: its gradient is kept and added again at
        the k - 1 steps that follow; `"scale"`: it is added k times over at the pass, nothing in between."""
        memory = self._fip_model.memory()
        step = self.fip_anchor_step
        self.fip_anchor_step = step + 1
        cache = self._fip_anchor_cache
        reuse = config.anchor_interval_mode == "reuse"
        if step % config.anchor_interval:
            if reuse and cache is not None and cache[0] is memory.reference:
                for p, gradient in cache[1]:
                    p.grad = gradient.clone() if p.grad is None else p.grad.add_(gradient)
                return None
            if not reuse:
                return None
            # no kept gradient (a resumed run whose checkpoint had none, new anchors since the pass): pass now
        params = [p for group in self.param_groups for p in group["params"]]
        task = [p.grad for p in params] if reuse else None
        if reuse:
            for p in params:
                p.grad = None
        with torch.enable_grad():
            found = self._anchor_objective(config)
            if found is not None:
                objective, distance = found
                (objective if reuse else objective * config.anchor_interval).backward()
        if reuse:
            kept = []
            for p, gradient in zip(params, task, strict=True):
                anchor, p.grad = p.grad, gradient
                if anchor is not None:
                    kept.append((p, anchor))
                    p.grad = anchor.clone() if gradient is None else gradient.add_(anchor)
            self._fip_anchor_cache = None if found is None else (memory.reference, kept)
        return None if found is None else self._record_distance(distance)

    def _record_distance(self, distance: torch.Tensor) -> torch.Tensor:
        """Add the pass's D to what `FIPTrainer` averages into `fip_distance`, and return it detached."""
        value = distance.detach()
        self.fip_distance_sum = self.fip_distance_sum + value
        self.fip_distance_count += 1
        return value

    def add_sparsity_gradient(self) -> None:
        """With `objective="sparsify"`: advance the sparsity schedule (prune the mask on update steps) and add the pull
        lambda * (w - P_s(w)) toward the target's magnitude projection to the gradient of `delta`."""
        fip_model = self._fip_model
        if fip_model.active_config.objective != "sparsify":
            return
        if not getattr(self, "_fip_pace_checked", False):
            # a scheduler's warmup starts lr near 0; the pace follows the peak rate it was built with
            rates = [group.get("initial_lr", group["lr"]) for group in self.param_groups if "betas" in group]
            if rates:
                fip_model.check_sparsity_pace(float(max(rates)))
            self._fip_pace_checked = True
        fip_model.sparsity_step()

    def pop_mean_distance(self) -> float | None:
        """Mean D over the steps since the last call (for logging)."""
        if not self.fip_distance_count:
            return None
        mean = float(self.fip_distance_sum) / self.fip_distance_count
        self.fip_distance_sum, self.fip_distance_count = 0.0, 0
        return mean

    def skip_nonfinite_step(self) -> bool:
        """Apply `FIPConfig.on_nonfinite` when this step's gradient (task loss + D / beta) or anchor distance D holds a
        NaN or an infinity: return True under "skip" (the step must change nothing), raise `NonFiniteStepError` under
        "raise". One host sync per step.
        """
        self.fip_steps += 1
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        flags = [torch.isfinite(local_tensor(p.grad)).all() for p in params]
        distance = self.fip_distance_sum
        if isinstance(distance, torch.Tensor):
            flags.append(torch.isfinite(distance))
        if not flags:
            return False
        finite = torch.stack([flag.to(flags[0].device) for flag in flags]).all()
        if self._fip_anchor_forward is not None:  # FSDP2: each process checked its shards; all must agree
            finite = all_processes(finite)
        if bool(finite):
            self.fip_consecutive_skips = 0
            return False
        names = {id(p): name for name, p in self._fip_model.named_parameters()}
        bad = [
            names.get(id(p), "an unnamed parameter") for p in params if not torch.isfinite(local_tensor(p.grad)).all()
        ]
        distance_bad = isinstance(distance, torch.Tensor) and not bool(torch.isfinite(distance))
        what = []
        if distance_bad:
            what.append("the anchor distance D")
        if bad:
            what.append(f"the gradient of {len(bad)} parameter tensors (e.g. {bad[0]})")
        where = f"FIP optimizer step {self.fip_steps}: {' and '.join(what)} is NaN or infinite"
        if distance_bad:  # keep the logged mean distance finite
            self.fip_distance_sum, self.fip_distance_count = 0.0, 0
        config = self._fip_model.active_config
        if config.on_nonfinite == "raise":
            raise NonFiniteStepError(
                f"{where}. Check the batch for NaN/inf inputs or labels and lower the learning rate; "
                "FIPConfig(on_nonfinite='skip') skips such steps instead."
            )
        self.fip_consecutive_skips = getattr(self, "fip_consecutive_skips", 0) + 1
        limit = config.max_consecutive_skips
        if limit is not None and self.fip_consecutive_skips >= limit:
            raise NonFiniteStepError(
                f"{where}, and the last {self.fip_consecutive_skips} steps were all skipped "
                f"(FIPConfig.max_consecutive_skips={limit}): the run has diverged and would skip every step from now "
                "on. Reload the last good checkpoint or adapter and train again with a lower learning rate (or "
                "gradient clipping: `create_fip_optimizer(..., max_grad_norm=1.0)`); raise max_consecutive_skips, or "
                "set it to None, to go on skipping."
            )
        for p in params:
            p.grad = None
        logger.warning(f"{where}; the step is skipped (parameters and optimizer state unchanged).")
        return True

    def clip_combined_gradient(self) -> torch.Tensor | None:
        """Clip the norm of the combined gradient (task loss + D / beta) to `fip_max_grad_norm`, when set.

        Clipping must come after the anchor gradient is added: clipping only the task gradient beforehand (what
        `Trainer` or a hand-written loop would do) shrinks the task term alone and lets D / beta dominate.
        """
        if self.fip_max_grad_norm is None:
            return None
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, self.fip_max_grad_norm)

    def check_active_adapter(self) -> None:
        """Refuse a step when none of this optimizer's parameters is a trainable parameter of the model now: after
        `set_adapter` (the old adapter's parameters are frozen, the new one's are not in this optimizer) or
        `delete_adapter`, the step would move nothing, silently. One pass over the parameter lists per step."""
        fip_model = self._fip_model
        trainable = {id(p) for p in fip_model.model.parameters() if p.requires_grad}
        if any(id(p) in trainable for group in self.param_groups for p in group["params"]):
            return
        raise RuntimeError(
            f"None of the parameters of this FIP optimizer ({type(self).__name__}) is a trainable parameter of the "
            f"model's active adapter {fip_model.active_adapters[0]!r}: it was built for another adapter (before "
            "`set_adapter` or `delete_adapter`), so its step would train nothing. Create a new optimizer after "
            "switching adapters: `fip_peft.create_fip_optimizer(model, ...)` (or a new `FIPTrainer`)."
        )

    def check_trainer(self) -> None:
        """Once, at the first step: refuse a plain `transformers.Trainer` (found on the call stack) driving this
        optimizer where it would scale the task loss against D / beta: with gradient accumulation or several processes,
        a model whose `forward` takes `**kwargs` but whose loss ignores `num_items_in_batch` (a classification head
        that builds `CrossEntropyLoss()` itself) gets its mean loss summed over the accumulation steps (and processes),
        so beta would silently act N times larger. `FIPTrainer` corrects this; nothing has moved when this raises."""
        if getattr(self, "_fip_trainer_checked", False):
            return
        trainer = _calling_trainer()
        if (
            trainer is None
            or getattr(trainer, "fip_averages_task_loss", False)
            or trainer.compute_loss_func is not None
        ):
            self._fip_trainer_checked = True
            return
        args = trainer.args
        factor = args.gradient_accumulation_steps * max(args.world_size, 1)
        if factor > 1 and trainer.model_accepts_loss_kwargs and not loss_uses_num_items(trainer.model):
            raise ValueError(
                f"Plain `transformers.Trainer` with a FIP optimizer and gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps} on {max(args.world_size, 1)} processes would not average the "
                "loss of this model over the accumulated batches (its forward takes **kwargs, so Trainer expects its "
                "loss to use `num_items_in_batch`, which it does not): the task gradient would be "
                f"{factor}x too large against D / beta, silently changing beta. Use `fip_peft.FIPTrainer` (same "
                "arguments; it averages correctly), or gradient_accumulation_steps=1 on one process."
            )
        self._fip_trainer_checked = True

    def check_engine(self) -> None:
        """Before the first step: refuse engines under which the anchor pass would be wrong (FSDP1, DeepSpeed), and
        route it through the FSDP2 root when the parameters are `fully_shard`-ed."""
        if not getattr(self, "_fip_engine_checked", False):
            optimized = [p for group in self.param_groups for p in group["params"]]
            self._fip_anchor_forward = anchor_forward(self._fip_model, self._fip_root, optimized)
            check_same_anchors(self._fip_model)
            self._fip_engine_checked = True

    def step(self, closure=None):
        """One FIP step. A `closure` (which zeroes the gradients and runs the task loss's backward) is evaluated first,
        under `torch.enable_grad()` as torch's own optimizers do, so that the anchor gradient is added to the task
        gradient it leaves (passing it on to the wrapped step would evaluate it after the anchor gradient and wipe
        it). The wrapped optimizer then steps without it; its loss is returned."""
        self.check_engine()
        self.check_active_adapter()
        self.check_trainer()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved = self._sampling_state()
        self.precondition_gradient()
        self.add_anchor_gradient()
        try:
            self.fip_step_was_skipped = self.skip_nonfinite_step()
        except NonFiniteStepError:
            self._restore_sampling_state(saved)
            raise
        if self.fip_step_was_skipped:
            self._restore_sampling_state(saved)
            return loss
        self.clip_combined_gradient()
        self.add_sparsity_gradient()
        self.solver_step()
        return loss

    def _sampling_state(self) -> tuple:
        """What the anchor and metric passes of a step change besides the gradients: every anchor memory's sampling
        counter (copied on its device, no host sync) and the natural solver's preconditioner (its step and refresh
        counters, metric and basis: `refresh` rebinds them, so a shallow copy keeps the old ones)."""
        counters = [(memory.sample_step, memory.sample_step.clone()) for memory in self._fip_model.fip_memory.values()]
        preconditioner = getattr(self, "_fip_preconditioner", None)
        lazy = (self.fip_anchor_step, self._fip_anchor_cache)  # `anchor_interval`'s counter and kept gradient
        return counters, preconditioner, None if preconditioner is None else dict(vars(preconditioner)), lazy

    def _restore_sampling_state(self, saved: tuple) -> None:
        """Undo what a skipped (or refused) step's anchor and metric passes changed, so that the step changes nothing:
        the next step draws the anchor batch and refreshes the metric as this one would have."""
        counters, preconditioner, state, (self.fip_anchor_step, self._fip_anchor_cache) = saved
        for counter, value in counters:
            counter.copy_(value)
        self._fip_preconditioner = preconditioner
        if preconditioner is not None:
            vars(preconditioner).clear()
            vars(preconditioner).update(state)

    def _preconditioner(self) -> MetricPreconditioner | OutputProjector | None:
        """The solver's state kept across steps on this optimizer: the Kronecker metric of the natural solvers, the
        anchors' Jacobian of the projection solvers, None for the penalty."""
        fip_model = self._fip_model
        adapter = fip_model.active_adapters[0]
        solver = fip_model.peft_config[adapter].solver
        if solver == "penalty":
            return None
        kind = OutputProjector if solver.startswith("projection") else MetricPreconditioner
        preconditioner = getattr(self, "_fip_preconditioner", None)
        if (
            not isinstance(preconditioner, kind)
            or preconditioner.fip_model is not fip_model
            or preconditioner.adapter != adapter
        ):
            if kind is OutputProjector and self._fip_anchor_forward is not None:
                raise NotImplementedError(
                    f"FIPConfig.solver={solver!r} does not support FSDP2-sharded parameters (its Jacobian is taken "
                    "per parameter on one process); use solver='penalty' under FSDP, or DDP."
                )
            preconditioner = self._fip_preconditioner = kind(fip_model, adapter)
        return preconditioner

    def precondition_gradient(self) -> None:
        """With `solver="natural"` or `"natural+penalty"`: replace the task gradient of each covered layer by
        P grad L, P the damped inverse metric (`MetricPreconditioner`, kept across steps on this optimizer). With
        `"projection"` solvers: refresh the anchors' Jacobian when due (`OutputProjector`)."""
        if (preconditioner := self._preconditioner()) is not None:
            preconditioner.precondition(self)

    def solver_step(self, closure=None):
        """The wrapped optimizer's step; with a natural solver and `epsilon` set the fixed-length step; with a
        projection solver the wrapped step's update projected onto the null space of the anchors' Jacobian."""
        if (preconditioner := self._preconditioner()) is None:
            return super().step(closure)
        return preconditioner.step(self, super().step, closure)


ANCHOR_INTERVAL_STATE = "fip_anchor_interval"


def _save_anchor_interval_state(optimizer: FIPStepMixin, state_dict: dict) -> dict:
    """Optimizer `state_dict` post-hook: add `FIPConfig.anchor_interval`'s step counter and, with `"reuse"`, the kept
    anchor gradient (by parameter index, as `state_dict["state"]`), so that a resumed run passes at the same steps
    and re-adds the same gradient until its next pass."""
    if getattr(optimizer, "fip_anchor_step", 0) == 0 and getattr(optimizer, "_fip_anchor_cache", None) is None:
        return state_dict
    saved = {"step": optimizer.fip_anchor_step}
    cache = optimizer._fip_anchor_cache
    if cache is not None:
        index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
        saved["gradients"] = {index[id(p)]: gradient for p, gradient in cache[1]}
    state_dict[ANCHOR_INTERVAL_STATE] = saved
    return state_dict


def _load_anchor_interval_state(optimizer: FIPStepMixin, state_dict: dict) -> None:
    """Optimizer `load_state_dict` pre-hook: restore what `_save_anchor_interval_state` added (a state without it, from
    a run with `anchor_interval=1` or before its first step, starts the counter at 0 with no kept gradient)."""
    saved = state_dict.get(ANCHOR_INTERVAL_STATE, {})
    optimizer.fip_anchor_step = int(saved.get("step", 0))
    optimizer._fip_anchor_cache = None
    gradients = saved.get("gradients")
    if gradients is None:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = [(p, g.to(device=p.device, dtype=p.dtype)) for p, g in ((params[int(i)], g) for i, g in gradients.items())]
    optimizer._fip_anchor_cache = (optimizer._fip_model.memory().reference, kept)


def _calling_trainer() -> object | None:
    """The `transformers.Trainer` whose method is on the call stack, if any."""
    try:
        from transformers import Trainer
    except ImportError:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


@cache
def _fip_optimizer_class(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    return type(f"FIP{optimizer_cls.__name__}", (FIPStepMixin, optimizer_cls), {"__module__": __name__})


def attach_fip_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, anchor_transform: Callable | None = None
) -> torch.optim.Optimizer:
    """Make an existing optimizer (e.g. the one `Trainer` built) perform the FIP step on `model`, in place."""
    _check_anchor_transform(anchor_transform)
    if not isinstance(optimizer, FIPStepMixin):
        optimizer.__class__ = _fip_optimizer_class(type(optimizer))
    optimizer.fip_anchor_transform = anchor_transform
    optimizer._attach_fip(find_fip_model(model), model)
    return optimizer


def create_fip_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    max_grad_norm: float | None = None,
    anchor_transform: Callable | None = None,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """Create an `optimizer_cls` over the trainable parameters of `model` whose `step()` is the FIP step.

    `max_grad_norm` clips the combined gradient (task loss + D / beta) inside the step. Use it instead of calling
    `clip_grad_norm_` before `step()`, which would clip the task gradient alone.

    `anchor_transform` augments the anchors afresh at every step (as DER augments its buffer): it gets the batch of
    anchors as `remember` was given them (a tensor for a custom module, else a dict of the model's input tensors)
    and returns the same kind with as many rows, e.g. a random crop and flip of images. The outputs on the
    augmented anchors are kept at the references recorded on the anchors themselves.

    Same shape as `peft.optimizers.create_loraplus_optimizer`:

        ```py
        >>> optimizer = create_fip_optimizer(model, torch.optim.AdamW, lr=1e-4)
        >>> loss.backward()
        >>> optimizer.step()  # descends the task loss while keeping the remembered outputs
        ```
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"`optimizer_cls` must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}.")
    _check_max_grad_norm(max_grad_norm)
    _check_anchor_transform(anchor_transform)
    fip_model = find_fip_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; is the FIP adapter in inference mode?")
    optimizer = _fip_optimizer_class(optimizer_cls)(params, **optimizer_kwargs)
    optimizer.fip_max_grad_norm = max_grad_norm
    optimizer.fip_anchor_transform = anchor_transform
    optimizer._attach_fip(fip_model, model)
    return optimizer


def _check_max_grad_norm(max_grad_norm: object) -> None:
    if max_grad_norm is None:
        return
    if not is_number(max_grad_norm) or not max_grad_norm > 0:
        raise ValueError(f"`max_grad_norm` must be a number > 0 or None (no clipping), got {max_grad_norm!r}.")


def _check_anchor_transform(anchor_transform: object) -> None:
    if anchor_transform is not None and not callable(anchor_transform):
        raise TypeError(
            f"`anchor_transform` must be a callable (anchors -> augmented anchors) or None, got "
            f"{type(anchor_transform).__name__}."
        )
