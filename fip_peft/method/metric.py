"""The FIP metric on a model: which layers it covers and how its Kronecker factors are gathered on the anchors.

Shared by the natural solvers (`fip_peft.optimizers.preconditioner`), the saliency and OBS sparsity criteria
(`fip_peft.method.sparsifier`) and `FIPModel.metric_spectrum`. The factor algebra is in `fip_peft.math.natural`; this
module adds the model side (the layers, the anchors, the seeds, the processes). It reads a `FIPModel` passed in and
never imports `fip_peft.method.model`, which imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..math.natural import CoveredLayer, KroneckerFactors, process_share
from ..math.seeds import counter_seed, generator
from . import layer as fip_layers
from .anchor_pass import anchor_outputs, eval_mode
from .checks import is_int

if TYPE_CHECKING:
    from .model import FIPModel


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


def check_conv(conv: nn.Conv2d, name: str) -> None:
    """Refuse convolutions whose weight is not a plain patch product (groups, string padding, non-zero padding)."""
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            f"FIPConfig.solver='natural' cannot precondition {name!r}: only Conv2d with groups=1 and numeric zero "
            f"padding is supported (got groups={conv.groups}, padding={conv.padding!r}, "
            f"padding_mode={conv.padding_mode!r}). Remove it from target_modules or use solver='penalty'."
        )


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
    The i-th anchor of `index` draws its output directions from seed `counter_seed(seed, i)` and chunk c its
    sampled positions from `counter_seed(seed, -1 - c)` (`fip_peft.math.seeds`), so neither depends on the chunk size
    or on which process gathers the chunk. `diagonal_only`: only their diagonals (no outer products).
    `across_processes` (every process must call it at the same time, as an optimizer step does): in a multi-process
    run each process gathers a contiguous share of the chunks and the shares are summed, so a refresh costs each of
    N processes 1 / N of the passes (`fip_peft.math.natural.process_share`)."""
    config = fip_model.peft_config[adapter]
    memory = fip_model.memory(adapter)
    model = fip_model.model
    factors = KroneckerFactors(layers, diagonal_only)
    chunks = index.split(config.metric_batch_size or config.anchor_batch_size)
    share = process_share(len(chunks)) if across_processes else range(len(chunks))
    starts = [0, *torch.tensor([len(chunk) for chunk in chunks]).cumsum(0).tolist()]
    with eval_mode(model):
        for number in share:
            inputs, _ = memory.batch(chunks[number])
            factors.add(
                lambda inputs=inputs: anchor_outputs(model, inputs, config.anchor_output_module),
                config.distance,
                config.metric_samples,
                generator(counter_seed(seed, -1 - number)),
                inputs.get("attention_mask"),
                config.metric_positions,
                [generator(counter_seed(seed, i)) for i in range(starts[number], starts[number + 1])],
            )
    if len(share) < len(chunks):
        factors.all_reduce(next(iter(layers.values())).weight.device)
    return factors


def metric_spectrum(fip_model: FIPModel, adapter: str, k: int) -> dict[str, torch.Tensor]:
    """Top-k eigenvalues of the Kronecker metric of every covered layer on the first `metric_anchors` anchors of a
    fixed random order (the training's anchor sampling is left untouched)."""
    if not is_int(k) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    config = fip_model.peft_config[adapter]
    memory = fip_model.memory(adapter)
    if len(memory) == 0:
        raise ValueError("`metric_spectrum` needs remembered anchors: call `model.remember(data)` first.")
    order = torch.randperm(len(memory), generator=torch.Generator().manual_seed(config.anchor_seed))
    index = order[: config.metric_anchors]
    factors = gather_factors(fip_model, adapter, covered_layers(fip_model, adapter), index, config.anchor_seed)
    return {name: layer_metric.top_eigenvalues(k) for name, layer_metric in factors.metric(config.damping).items()}
