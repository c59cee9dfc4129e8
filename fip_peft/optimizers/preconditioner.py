"""The natural FIP step (`solver="natural"` / `"natural+penalty"`) on a model: when the metric is refreshed, and how
the optimizer's step uses it. The layers it covers and the gathering of its factors are in `fip_peft/method/metric.py`,
the math in `fip_peft/math/natural.py`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers.utils import logging

from ..math.natural import CoveredLayer, Eigen, LayerMetric
from ..math.seeds import DIRECTION_SEED_OFFSET, counter_seed
from ..method.metric import covered_layers, gather_factors

if TYPE_CHECKING:
    from ..method.model import FIPModel

logger = logging.get_logger(__name__)


class MetricPreconditioner:
    """Keeps the Kronecker metric of one adapter, refreshed every `metric_update_interval` optimizer steps on
    `metric_anchors` anchors, and preconditions each step with it.

    Each covered layer's gradient becomes P grad L, P = lambda (g + lambda I)^-1 (the direction of the paper's
    step). `"natural+penalty"` then adds grad D / beta unpreconditioned, so the penalty pulls back drift the
    preconditioned direction let through. Then:

    - `epsilon=None` (default): the wrapped optimizer (SGD, AdamW, ...) steps on these gradients. With SGD the step is
      -lr P grad L; with Adam its per-coordinate scaling sets the length, so the directions the metric leaves free
      move at the usual speed. (Projecting Adam's update afterwards instead, P u, kept task A but learned nothing of
      task B on split digits, measured in docs/benchmarks.md.)
    - `epsilon=e`: the paper's fixed-length step: the covered parameters move by -e P grad / |P grad| (e times
      lr / initial_lr under a schedule), the others take the wrapped optimizer's step.

    Anchors and output directions come from seeded counters, the same on every process of a distributed run. Each
    process gathers the factors on its share of a refresh's anchor chunks and the shares are summed (one all-reduce
    per factor), so all processes hold the same metric and a refresh costs each of N processes 1 / N of its passes.
    """

    def __init__(self, fip_model: FIPModel, adapter: str) -> None:
        self.fip_model = fip_model
        self.adapter = adapter
        self.layers = covered_layers(fip_model, adapter)
        self.metric: dict[str, LayerMetric] | None = None
        self.basis: dict[str, Eigen] = {}
        self.steps = 0
        self.refreshes = 0
        self._layers: dict[str, CoveredLayer] = {}

    @property
    def config(self):
        return self.fip_model.peft_config[self.adapter]

    def refresh(self) -> None:
        """Recompute the metric on the next `metric_anchors` anchors; keep the previous one if it is not finite.
        Every `metric_basis_interval`-th refresh eigendecomposes the factors; the others refresh the eigenvalues
        in the last eigenbasis."""
        config = self.config
        memory = self.fip_model.memory(self.adapter)
        index = memory.next_batch_index(config.metric_anchors, config.anchor_seed)
        seed = counter_seed(config.anchor_seed, int(memory.sample_step)) + DIRECTION_SEED_OFFSET
        basis = self.basis if self.refreshes % config.metric_basis_interval else None
        try:
            factors = gather_factors(self.fip_model, self.adapter, self.layers, index, seed, across_processes=True)
            metric = factors.metric(config.damping, basis)
        except torch.linalg.LinAlgError as error:
            logger.warning(f"The FIP metric could not be refreshed ({error}); the previous one is kept.")
            return
        values = [t for m in metric.values() for t in (m.a.values, m.g.values)]
        finite = all(math.isfinite(m.damping) for m in metric.values()) and (
            not values or bool(torch.isfinite(torch.cat(values)).all())
        )
        if not finite:
            logger.warning("The FIP metric on this anchor batch is NaN or infinite; the previous one is kept.")
            return
        self.metric, self.basis = metric, factors.eigen
        self.refreshes += 1

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What a checkpoint keeps (`FIPTrainer`), so that a resumed run refreshes at the same steps with the same
        metric as an uninterrupted one: the step and refresh counters and eigen forms (JSON), the metric and the
        eigenbasis (tensors, each a copy: layers sharing an input share theirs, and safetensors refuses shared
        memory)."""
        tensors: dict[str, torch.Tensor] = {}

        def put(prefix: str, eigen: Eigen) -> dict:
            for part in ("values", "vectors", "index"):
                if (tensor := getattr(eigen, part)) is not None:
                    tensors[f"{prefix}/{part}"] = tensor.detach().contiguous().clone().cpu()
            return {"dim": eigen.dim, "trace": eigen.trace}

        metric = None
        if self.metric is not None:
            metric = {
                name: {"damping": m.damping, "a": put(f"metric/{name}/a", m.a), "g": put(f"metric/{name}/g", m.g)}
                for name, m in self.metric.items()
            }
        basis = {key: put(f"basis/{key}", eigen) for key, eigen in self.basis.items()}
        info = {"adapter": self.adapter, "steps": self.steps, "refreshes": self.refreshes}
        return info | {"metric": metric, "basis": basis}, tensors

    def load_state(self, info: dict, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Restore what `state` returned (resuming from a checkpoint)."""
        device = next(iter(self.layers.values())).weight.device if self.layers else torch.device("cpu")

        def get(prefix: str, meta: dict) -> Eigen:
            parts = {part: tensors.get(f"{prefix}/{part}") for part in ("values", "vectors", "index")}
            parts = {part: t.to(device) if t is not None else None for part, t in parts.items()}
            return Eigen(parts["values"], meta["dim"], meta["trace"], vectors=parts["vectors"], index=parts["index"])

        self.steps, self.refreshes = int(info["steps"]), int(info["refreshes"])
        self.metric = None
        if info["metric"] is not None:
            self.metric = {
                name: LayerMetric(get(f"metric/{name}/a", m["a"]), get(f"metric/{name}/g", m["g"]), m["damping"])
                for name, m in info["metric"].items()
            }
        self.basis = {key: get(f"basis/{key}", meta) for key, meta in info["basis"].items()}
        self._layers = self._preconditioned(optimizer)

    def precondition(self, optimizer: torch.optim.Optimizer) -> None:
        """Refresh the metric when due, then replace each covered layer's gradient by P grad. Called before the
        anchor gradient of `"natural+penalty"` is added, so that grad D / beta stays unpreconditioned."""
        if len(self.fip_model.memory(self.adapter)) == 0:
            self.metric, self._layers = None, {}
            return
        if self.metric is None or self.steps % self.config.metric_update_interval == 0:
            self.refresh()
            self._layers = self._preconditioned(optimizer)
        self.steps += 1
        with torch.no_grad():
            for name, layer in self._layers.items():
                if all(p.grad is None for p in layer.params):
                    continue
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.params]
                projected = layer.from_matrix(self.metric[name].project(layer.as_matrix(*grads)))
                for p, new in zip(layer.params, projected, strict=True):
                    p.grad = new.to(p.dtype).contiguous()

    def _preconditioned(self, optimizer: torch.optim.Optimizer) -> dict[str, CoveredLayer]:
        """The covered layers the metric has and `optimizer` steps: set at each refresh and read by every step, so a
        parameter group added between refreshes is preconditioned from the next refresh on."""
        if self.metric is None:
            return {}
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return {
            name: layer
            for name, layer in self.layers.items()
            if name in self.metric and all(id(p) in in_optimizer for p in layer.params)
        }

    def step(self, optimizer: torch.optim.Optimizer, base_step: Callable, closure=None):
        """The wrapped optimizer's step on the (preconditioned) gradients, or with `epsilon` the fixed-length step."""
        layers = self._layers
        if self.config.epsilon is None or not layers:
            return base_step(closure)
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        return self._epsilon_step(layers, groups, base_step, closure)

    def _epsilon_step(self, layers: dict[str, CoveredLayer], groups: dict, base_step: Callable, closure):
        directions = {
            name: [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.params]
            for name, layer in layers.items()
            if any(p.grad is not None for p in layer.params)
        }
        with torch.no_grad():
            norm = math.sqrt(sum(float(d.float().pow(2).sum()) for ds in directions.values() for d in ds))
        for name in directions:
            for p in layers[name].params:
                p.grad = None
        result = base_step(closure)
        if norm == 0:
            return result
        with torch.no_grad():
            for name, tensors in directions.items():
                for p, direction in zip(layers[name].params, tensors, strict=True):
                    group = groups[id(p)]
                    lr, initial = float(group["lr"]), float(group.get("initial_lr", group["lr"]))
                    if lr == 0:  # a frozen group (or a schedule at 0) does not move, whatever its initial rate
                        continue
                    scale = self.config.epsilon * (lr / initial if initial else 1.0)
                    p.add_(direction.to(p.dtype), alpha=-scale / norm)
        return result
