"""FIP tuner layers: each holds the weight displacement `delta` of one base layer.

The adapted weight is `W + delta`. A full-rank adapter stores `delta` itself (`fip_delta`); a low-rank adapter stores
`delta = B @ A` over the weight viewed as a (rows, cols) matrix, with `B` zero-initialised (`fip_B`, `fip_A`), as LoRA
does. Because the base weight is never touched, disabling the adapter gives back the base function exactly.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

INIT_STD = 0.02


class FIPLayer(BaseTunerLayer):
    """Shared state and merge logic of all FIP layers."""

    adapter_layer_names = ("fip_delta", "fip_A", "fip_B")
    other_param_names = ("rank", "fip_mask")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.rank: dict[str, int | None] = {}
        self.fip_delta = nn.ParameterDict({})
        self.fip_A = nn.ParameterDict({})
        self.fip_B = nn.ParameterDict({})
        self.fip_mask = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        weight = getattr(self.get_base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(
                f"FIP adapts floating-point weights only; {type(self.get_base_layer()).__name__} has weight of "
                f"dtype {getattr(weight, 'dtype', None)}. Quantized layers are not supported: remove them from "
                "target_modules."
            )

    @property
    def _weight_matrix_shape(self) -> tuple[int, int]:
        shape = self.get_base_layer().weight.shape
        return shape[0], math.prod(shape[1:])

    def update_layer(
        self,
        adapter_name: str,
        rank: int | None,
        init_weights: bool = True,
        inference_mode: bool = False,
        sparsify: bool = False,
        **kwargs,
    ) -> None:
        """Create the displacement of `adapter_name` on this layer (and, with `sparsify`, its all-keep mask)."""
        weight = self.get_base_layer().weight
        rows, cols = self._weight_matrix_shape
        self.rank[adapter_name] = rank
        if rank is None:
            delta = torch.zeros(weight.shape) if init_weights else torch.randn(weight.shape) * INIT_STD
            self.fip_delta[adapter_name] = nn.Parameter(delta)
        else:
            if rank > min(rows, cols):
                warnings.warn(
                    f"FIP rank {rank} exceeds the rank {min(rows, cols)} of a {rows}x{cols} weight; a full-rank "
                    "displacement (rank=None) is cheaper here.",
                    stacklevel=2,
                )
            a = torch.empty(rank, cols)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(rows, rank) if init_weights else torch.randn(rows, rank) * INIT_STD
            self.fip_A[adapter_name] = nn.Parameter(a)
            self.fip_B[adapter_name] = nn.Parameter(b)
        if sparsify:
            self.fip_mask[adapter_name] = torch.ones(weight.shape, dtype=torch.bool)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _has(self, adapter: str) -> bool:
        return adapter in self.rank

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The displacement `delta` of `adapter`, shaped like the base weight."""
        weight = self.get_base_layer().weight
        if self.rank[adapter] is None:
            return self.fip_delta[adapter]
        return (self.fip_B[adapter] @ self.fip_A[adapter]).view(weight.shape)

    def _active(self) -> list[str]:
        return [name for name in self.active_adapters if self._has(name)]

    def _adapted_weight(self, adapters: list[str]) -> torch.Tensor:
        weight = self.get_base_layer().weight
        for name in adapters:
            weight = weight + self.get_delta_weight(name).to(weight.dtype)
            if name in self.fip_mask:
                weight = weight * self.fip_mask[name]
        return weight

    # ---- sparsity (objective="sparsify") ----------------------------------------------------------------------------

    def sparse_weight(self, adapter: str) -> torch.Tensor:
        """The effective weight `(W + delta) * mask` of `adapter` (detached); the base weight itself once merged."""
        if self.merged:
            return self.get_base_layer().weight.detach()
        return self._adapted_weight([adapter]).detach()

    def set_mask(self, adapter: str, mask: torch.Tensor) -> None:
        """Prune the entries where `mask` is False (they stay pruned) and fold them into `delta` (delta = -W there),
        so that `W + delta` is exactly zero where pruned and merging needs no mask."""
        with torch.no_grad():
            kept = self.fip_mask[adapter] & mask.to(self.fip_mask[adapter].device)
            self.fip_mask[adapter] = kept
            self._fold_mask(adapter)

    def set_sparse_weight(self, adapter: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Make the effective weight `weight` (delta = weight - W: a pruning that also moves the kept entries) and
        prune where `mask` is False, as `set_mask`."""
        with torch.no_grad():
            delta = self.fip_delta[adapter]
            base = self.get_base_layer().weight.detach()
            delta.copy_((weight.to(base.device).float() - base.float()).to(delta.dtype))
        self.set_mask(adapter, mask)

    def _fold_mask(self, adapter: str) -> None:
        if adapter not in self.fip_mask or self.rank[adapter] is not None:
            return
        base = self.get_base_layer().weight
        with torch.no_grad():
            delta = self.fip_delta[adapter]
            delta.data.copy_(torch.where(self.fip_mask[adapter], delta, -base.detach().to(delta.dtype)))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the displacements into the base weight."""
        for name in check_adapters_to_merge(self, adapter_names):
            if not self._has(name):
                continue
            base = self.get_base_layer()
            self._fold_mask(name)
            with torch.no_grad():
                merged = base.weight + self.get_delta_weight(name).to(base.weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}: it is broken.")
                base.weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged displacements from the base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def _base_only(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | None:
        """The base layer's output when no unmerged adapter applies, else None."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self._active():
            return self.base_layer(x, *args, **kwargs)
        return None


class FIPModule(nn.Module, FIPLayer):
    """An `nn.Module` FIP layer wrapping `base_layer` with the displacement of `adapter_name`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, rank: int | None = None, **kwargs) -> None:
        super().__init__()
        FIPLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, rank, **kwargs)

    def __repr__(self) -> str:
        return "fip." + super().__repr__()


class _DenseFIPModule(FIPModule):
    """Shared forward of the matrix-product layers: full-rank displacements join the weight, low-rank ones add a
    `x -> B A`-style term without forming `B @ A`."""

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _low_rank_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._base_only(x, *args, **kwargs)
        if result is not None:
            return result
        active = self._active()
        full = [name for name in active if self.rank[name] is None]
        if full:
            result = self._with_weight(x, self._adapted_weight(full))
        else:
            result = self.base_layer(x, *args, **kwargs)
        for name in active:
            if self.rank[name] is not None:
                result = result + self._low_rank_term(x, name).to(result.dtype)
        return result


class Linear(_DenseFIPModule):
    """FIP on `nn.Linear`: `y = x (W + delta)^T + b`; low rank adds `x A^T B^T` as LoRA does."""

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(weight.dtype), weight, self.get_base_layer().bias)

    def _low_rank_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        a, b = self.fip_A[adapter], self.fip_B[adapter]
        return F.linear(F.linear(x.to(a.dtype), a), b)


class Conv1D(_DenseFIPModule):
    """FIP on transformers' `Conv1D` (GPT-2), whose weight is stored (in, out): `y = x (W + delta) + b`."""

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return torch.addmm(self.get_base_layer().bias, flat, weight).view(*x.shape[:-1], weight.shape[1])

    def _low_rank_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        b, a = self.fip_B[adapter], self.fip_A[adapter]
        return (x.to(b.dtype) @ b) @ a


class Embedding(FIPModule):
    """FIP on `nn.Embedding`: looks rows up in `W` and in `delta` (never materialising `W + delta`)."""

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._base_only(x, *args, **kwargs)
        if result is not None:
            return result
        active = self._active()
        if any(name in self.fip_mask for name in active):
            return self._lookup(x, self._adapted_weight(active))
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            if self.rank[name] is None:
                result = result + self._lookup(x, self.fip_delta[name]).to(result.dtype)
            else:
                result = result + (self._lookup(x, self.fip_B[name]) @ self.fip_A[name]).to(result.dtype)
        return result


class Conv2d(FIPModule):
    """FIP on `nn.Conv2d`: one convolution with the kernel `W + delta`."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._base_only(x, *args, **kwargs)
        if result is not None:
            return result
        base = self.get_base_layer()
        weight = self._adapted_weight(self._active())
        return base._conv_forward(x.to(weight.dtype), weight, base.bias)


LAYER_CLASSES: dict[type[nn.Module], type[FIPLayer]] = {
    nn.Linear: Linear,
    nn.Embedding: Embedding,
    nn.Conv2d: Conv2d,
}


def fip_layer_class(base_layer: nn.Module) -> type[FIPLayer]:
    """The FIP layer class that adapts `base_layer`, or a `TypeError` listing what is supported."""
    if isinstance(base_layer, HFConv1D):
        return Conv1D
    for base_cls, layer_cls in LAYER_CLASSES.items():
        if isinstance(base_layer, base_cls):
            return layer_cls
    raise TypeError(
        f"FIP cannot adapt {type(base_layer).__name__}; target_modules may name nn.Linear, nn.Conv2d, nn.Embedding "
        "or transformers' Conv1D modules."
    )
