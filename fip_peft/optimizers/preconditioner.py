"""The natural FIP step (`solver="natural"` / `"natural+penalty"`) on a model: which layers the metric covers, when
the metric is refreshed, and how the optimizer's step uses it. The math lives in `fip_peft/natural.py`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.utils import logging

from .. import layer as fip_layers
from ..distributed import process_share, sum_factors_across_processes
from ..model import FIPModel
from ..natural import CoveredLayer, Eigen, KroneckerFactors, LayerMetric, check_conv

logger = logging.get_logger(__name__)

# Offset between the seeds of anchor sampling and of the metric's output directions.
DIRECTION_SEED_OFFSET = 7919
# A refresh seeded s seeds anchor i's output directions with s x this + i, chunk c's positions with s x this - 1 - c.
SEED_STRIDE = 1_000_003


def covered_layers(fip_model: FIPModel, adapter: str) -> dict[str, CoveredLayer]:
    """The layers the metric preconditions: every full-rank FIP displacement of `adapter` that is trained, and every
    trained `nn.Linear` outside the adapter (a head in `modules_to_save`, weight and bias). Other trainable
    parameters (norms, other module types) take the base optimizer's step unchanged."""
    layers = {}
    for name, module in fip_model.model.named_modules():
        if isinstance(module, fip_layers.FIPLayer):
            delta = module.fip_delta[adapter] if adapter in module.fip_delta else None
            if delta is not None and delta.requires_grad:
                layers[name] = fip_covered_layer(name, module, delta)
        elif isinstance(module, nn.Linear) and module.weight.requires_grad:
            bias = module.bias if module.bias is not None and module.bias.requires_grad else None
            layers[name] = CoveredLayer(module, "linear", module.weight, bias=bias)
    return layers


def fip_covered_layer(name: str, module: fip_layers.FIPLayer, delta: nn.Parameter) -> CoveredLayer:
    """The full-rank FIP displacement `delta` of `module` as the metric sees it."""
    if isinstance(module, fip_layers.Conv2d):
        check_conv(module.get_base_layer(), name)
        return CoveredLayer(module, "conv2d", delta)
    if isinstance(module, fip_layers.Embedding):
        return CoveredLayer(module, "embedding", delta, transposed=True)
    return CoveredLayer(module, "linear", delta, transposed=isinstance(module, fip_layers.Conv1D))


def gather_factors(
    fip_model: FIPModel,
    adapter: str,
    layers: dict[str, CoveredLayer],
    index: torch.Tensor,
    seed: int,
    diagonal_only: bool = False,
    across_processes: bool = False,
) -> KroneckerFactors:
    """The Kronecker factors of `layers` on the anchors at `index` (eval mode), gathered in chunks of
    `metric_batch_size` anchors (default `anchor_batch_size`: a refresh holds no more activations than a step).
    The i-th anchor of `index` draws its output directions from seed `seed` x `SEED_STRIDE` + i and chunk c its
    sampled positions from `seed` x `SEED_STRIDE` - 1 - c, so neither depends on the chunk size or on which process
    gathers the chunk. `diagonal_only`: only their diagonals (no outer products). `across_processes` (every
    process must call it at the same time, as an optimizer step does): in a multi-process run each process
    gathers a contiguous share of the chunks and the shares are summed, so a refresh costs each of N processes
    1 / N of the passes (`fip_peft.distributed.process_share`)."""
    config = fip_model.peft_config[adapter]
    memory = fip_model.memory(adapter)
    factors = KroneckerFactors(layers, diagonal_only)
    chunks = index.split(config.metric_batch_size or config.anchor_batch_size)
    share = process_share(len(chunks)) if across_processes else range(len(chunks))
    starts = [0, *torch.tensor([len(chunk) for chunk in chunks]).cumsum(0).tolist()]
    with fip_model._evaluating():
        for number in share:
            inputs, _ = memory.batch(chunks[number])
            factors.add(
                lambda inputs=inputs: fip_model._run(inputs, adapter_name=adapter),
                config.distance,
                config.metric_samples,
                _generator(seed * SEED_STRIDE - 1 - number),
                inputs.get("attention_mask"),
                config.metric_positions,
                [_generator(seed * SEED_STRIDE + i) for i in range(starts[number], starts[number + 1])],
            )
    if len(share) < len(chunks):
        sum_factors_across_processes(factors, next(iter(layers.values())).weight.device)
    return factors


def _generator(seed: int) -> torch.Generator:
    """A CPU generator seeded by `seed` taken modulo 2^64 (any int, negative or large, is a valid seed)."""
    return torch.Generator().manual_seed(seed % 2**64)


def metric_spectrum(fip_model: FIPModel, adapter: str, k: int) -> dict[str, torch.Tensor]:
    """Top-k eigenvalues of the Kronecker metric of every covered layer on the first `metric_anchors` anchors of a
    fixed random order (the training's anchor sampling is left untouched)."""
    config = fip_model.peft_config[adapter]
    memory = fip_model.memory(adapter)
    if len(memory) == 0:
        raise ValueError("`metric_spectrum` needs remembered anchors: call `model.remember(data)` first.")
    order = torch.randperm(len(memory), generator=torch.Generator().manual_seed(config.anchor_seed))
    index = order[: config.metric_anchors]
    factors = gather_factors(fip_model, adapter, covered_layers(fip_model, adapter), index, config.anchor_seed)
    return {name: layer_metric.top_eigenvalues(k) for name, layer_metric in factors.metric(config.damping).items()}


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
        seed = config.anchor_seed * 1_000_003 + int(memory.sample_step) + DIRECTION_SEED_OFFSET
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
