"""The projected FIP step (`solver="projection"` / `"projection+penalty"`) on a model: which anchors and output
directions give the Jacobian's rows, when it is refreshed, and how the optimizer's update is projected. The math
lives in `fip_peft/math/projection.py`.

The projection is applied to the wrapped optimizer's *update* (w_new - w_old after AdamW, SGD, ...), not to its
gradient: an adaptive optimizer divides each coordinate of the gradient by its own running scale, which would blow the
components the projection removed back up (Adam-NSCL projects Adam's update for the same reason).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..math.projection import OutputProjection
from ..method.anchor_pass import anchor_outputs, eval_mode

logger = logging.get_logger(__name__)

# Outputs per anchor up to which every output coordinate is a row of J (a classifier's logits); above it each anchor
# gives `metric_samples` random directions of its outputs (a sketch: token-level or hidden outputs).
EXACT_OUTPUTS = 64
# Largest Jacobian (rows x trained parameters, in bytes) a refresh may hold.
MAX_JACOBIAN_BYTES = 4 * 2**30
# Offset between the seeds of anchor sampling and of the sketch's output directions.
SKETCH_SEED_OFFSET = 104_729


class OutputProjector:
    """Keeps the Jacobian of the anchors' outputs (`metric_anchors` anchors, refreshed every
    `metric_update_interval` optimizer steps) and projects each update of the wrapped optimizer onto its damped null
    space, so that the outputs on those anchors stay put to first order."""

    def __init__(self, fip_model: nn.Module, adapter: str) -> None:
        self.fip_model = fip_model
        self.adapter = adapter
        self.projection: OutputProjection | None = None
        self.params: list[nn.Parameter] = []
        self.steps = 0
        self.refreshes = 0

    @property
    def config(self):
        return self.fip_model.peft_config[self.adapter]

    def precondition(self, optimizer: torch.optim.Optimizer) -> None:
        """Refresh the Jacobian when due; the gradients are left as they are."""
        memory = self.fip_model.memory(self.adapter)
        if len(memory) == 0:
            self.projection = None
            return
        if self.projection is None or self.steps % self.config.metric_update_interval == 0:
            self.refresh(optimizer)
        self.steps += 1

    def refresh(self, optimizer: torch.optim.Optimizer) -> None:
        """J on the next `metric_anchors` anchors at the current weights."""
        config = self.config
        memory = self.fip_model.memory(self.adapter)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        index = memory.next_batch_index(min(config.metric_anchors, len(memory)), config.anchor_seed)
        generator = torch.Generator().manual_seed(config.anchor_seed + int(memory.sample_step) + SKETCH_SEED_OFFSET)
        check_jacobian_size(config, params, memory, index)
        blocks, _ = jacobian_rows(self.fip_model, self.adapter, params, index, generator)
        try:
            projection = OutputProjection(blocks, config.damping)
        except torch.linalg.LinAlgError as error:
            logger.warning(f"The FIP projection could not be refreshed ({error}); the previous one is kept.")
            return
        if not bool(torch.isfinite(projection.gram).all()):
            logger.warning("The FIP Jacobian on this anchor batch is NaN or infinite; the previous one is kept.")
            return
        self.projection, self.params = projection, params
        self.refreshes += 1

    def step(self, optimizer: torch.optim.Optimizer, base_step, closure=None):
        """The wrapped optimizer's step, then its update projected: w <- w_old + P (w_new - w_old)."""
        if self.projection is None:
            return base_step(closure)
        with torch.no_grad():
            old = [p.detach().clone() for p in self.params]
        result = base_step(closure)
        with torch.no_grad():
            updates = [p.detach() - o for p, o in zip(self.params, old, strict=True)]
            self.projection.project_(updates)
            for p, o, u in zip(self.params, old, updates, strict=True):
                p.copy_(o.add_(u))
        return result

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What a checkpoint keeps (`FIPTrainer`): the counters (JSON) and the Jacobian's blocks (tensors), so that a
        resumed run projects with the same J until its next refresh, as the uninterrupted one does."""
        info = {"adapter": self.adapter, "steps": self.steps, "refreshes": self.refreshes, "kind": "projection"}
        tensors = {}
        if self.projection is not None:
            # each block has its own storage (no clone needed for safetensors); `.cpu()` copies only off the CPU
            tensors = {f"jacobian/{i}": b.detach().cpu().contiguous() for i, b in enumerate(self.projection.blocks)}
        return info, tensors

    def load_state(self, info: dict, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Restore what `state` returned (resuming from a checkpoint)."""
        self.steps, self.refreshes = int(info["steps"]), int(info["refreshes"])
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not tensors:
            self.projection = None
            return
        blocks = [tensors[f"jacobian/{i}"].to(p.device).reshape(-1, *p.shape) for i, p in enumerate(params)]
        self.projection, self.params = OutputProjection(blocks, self.config.damping), params


def check_jacobian_size(config, params: list[nn.Parameter], memory, index: torch.Tensor) -> None:
    """Refuse, before any pass, a Jacobian that would not fit `MAX_JACOBIAN_BYTES`: rows x trained parameters."""
    outputs = memory.reference[index[:1]]
    per_anchor = outputs[0].numel()
    rows = len(index) * (per_anchor if per_anchor <= EXACT_OUTPUTS else config.metric_samples)
    size = rows * sum(p.numel() * p.element_size() for p in params)
    if size > MAX_JACOBIAN_BYTES:
        fits = max(1, int(MAX_JACOBIAN_BYTES // max(size // len(index), 1)))
        raise ValueError(
            f"FIPConfig.solver={config.solver!r} would hold a Jacobian of {rows} rows x "
            f"{sum(p.numel() for p in params):,} trained parameters ({size / 2**30:.1f} GiB) for "
            f"metric_anchors={config.metric_anchors}: set metric_anchors={fits} or fewer, train a low-rank adapter "
            "(rank=r), or use solver='penalty'."
        )


def jacobian_rows(
    fip_model: nn.Module,
    adapter: str,
    params: list[nn.Parameter],
    index: torch.Tensor,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The rows of B J on the anchors at `index` (eval mode), one block per parameter of shape (rows, *p.shape),
    and the output drift B (f(w) - f_ref) in the same rows. B is the distance's output metric factor (M = B^T B):
    the identity for `logits`, diag(sqrt p) (I - 1 p^T) per position for the softmax distances, restricted to
    `metric_samples` random directions per anchor when an anchor has more than `EXACT_OUTPUTS` outputs.

    Each anchor runs alone (its padding cut off) and its rows come from one backward pass batched over its output
    directions (`is_grads_batched`): as many example-backwards as rows, and no vmap of the forward pass, so any model
    that runs forward runs here."""
    config = fip_model.peft_config[adapter]
    memory = fip_model.memory(adapter)
    blocks: list[list[torch.Tensor]] = [[] for _ in params]
    residuals = []
    with eval_mode(fip_model.model), torch.enable_grad():
        for i in index.tolist():
            inputs, reference = memory.batch(torch.tensor([i]))
            inputs = _trim_padding(inputs)
            outputs = anchor_outputs(fip_model.model, inputs, config.anchor_output_module)
            reference = reference.to(outputs.device)
            if outputs.dim() == 3 and reference.shape[1] > outputs.shape[1]:  # token outputs, padding cut off
                reference = reference[:, : outputs.shape[1]]
            mask = inputs.get("attention_mask")
            directions, drift = output_directions(
                outputs.detach(), reference, config.distance, mask, config.metric_samples, generator
            )
            grads = torch.autograd.grad(
                outputs, params, grad_outputs=directions.to(outputs.dtype), is_grads_batched=True, allow_unused=True
            )
            for block, grad, p in zip(blocks, grads, params, strict=True):
                block.append(grad.detach() if grad is not None else p.new_zeros((len(directions), *p.shape)))
            residuals.append(drift)
    for i, block in enumerate(blocks):  # one parameter at a time: no second copy of all of J at once
        blocks[i] = torch.cat(block)
        del block
    return blocks, torch.cat(residuals)


def output_directions(
    outputs: torch.Tensor,
    reference: torch.Tensor,
    distance: str,
    mask: torch.Tensor | None,
    samples: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For one anchor's `outputs` (1, ..., C): the cotangents V (rows, *outputs.shape) whose vector-Jacobian products
    are the rows of B J, and the drift V . (outputs - reference) in the same rows."""
    c = outputs.shape[-1]
    flat = outputs.float().reshape(-1, c)  # positions x classes
    ref = reference.float().reshape(-1, c)
    positions = torch.arange(flat.shape[0], device=flat.device)
    if mask is not None and outputs.dim() == 3 and mask.shape[:2] == outputs.shape[:2]:
        positions = positions[mask.reshape(-1).bool()]
    if distance == "logits":
        per_position = torch.eye(c, device=flat.device).expand(flat.shape[0], c, c)
    else:
        p = flat.softmax(-1)
        # B = diag(sqrt p) (I - 1 p^T): B^T B = diag(p) - p p^T, the output Fisher (the metric up to a constant)
        eye = torch.eye(c, device=flat.device)
        per_position = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])
    if len(positions) * c <= EXACT_OUTPUTS:
        rows = []
        for t in positions.tolist():
            v = torch.zeros(c, flat.shape[0], c, device=flat.device)
            v[:, t] = per_position[t]
            rows.append(v)
        directions = torch.cat(rows) if rows else torch.zeros(0, *flat.shape, device=flat.device)
    else:  # a sketch: random combinations of the valid positions' rows
        signs = torch.randint(0, 2, (samples, len(positions), c), generator=generator).float() * 2 - 1
        signs = signs.to(flat.device) / (len(positions) * c) ** 0.5
        directions = torch.zeros(samples, *flat.shape, device=flat.device)
        directions[:, positions] = torch.einsum("spc,pcd->spd", signs, per_position[positions])
    drift = (directions * (flat - ref)[None]).sum(dim=(1, 2))
    return directions.reshape(len(directions), *outputs.shape), drift


def _trim_padding(inputs: dict) -> dict:
    """One anchor's inputs without the right padding its batch gave it (no tokens to run, same outputs)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[0] != 1:
        return inputs
    length = int(mask.sum())
    if length == 0 or not bool(mask[0, :length].all()):
        return inputs  # not right-padded: keep every position
    return {k: v[:, :length] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v for k, v in inputs.items()}
