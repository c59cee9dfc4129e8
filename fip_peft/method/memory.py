"""`AnchorMemory`: the anchors X_a of one adapter and the reference outputs f(X_a; w_ref) recorded on them.

It is an `nn.Module` whose tensors are buffers, so it lives on the model's device and, when the config says
`save_anchors=True`, travels inside `adapter_model.safetensors`.

The references are kept in one of three forms (`FIPConfig.reference_mode`, recorded in the `reference_kind` buffer so
that a saved memory says which it holds): in full; as top-k log-probabilities plus the rest of the classes
(`distances.TopKReference`: `reference` holds the k + 1 log-probabilities, `reference_index` the k indices); or not
at all, recomputed from the base model at every step (`reference` is then empty per anchor, shape (N, 0)).
"""

from __future__ import annotations

import torch
from torch import nn

from ..math.distances import TopKReference
from ..math.seeds import counter_seed, generator
from .anchors import AnchorInputs, concat_inputs, num_rows, pad_labels, select_rows

ANCHOR_PREFIX = "anchor__"
NO_LABEL = -100  # as transformers' ignore_index: an anchor (or a token of one) without a label
MAX_REFERENCE_BYTES = 2 * 1024**3
# How the references are kept (`reference_kind` buffer), the resolved `FIPConfig.reference_mode`.
REFERENCE_KINDS = ("full", "top_k", "recompute")


class AnchorMemory(nn.Module):
    """Anchors grouped by task (`task_ids`), their reference outputs, their labels where `remember` was given them
    (`NO_LABEL` elsewhere), and the sampling step counter.

    With `persistent=False` (config `save_anchors=False`) none of it enters `state_dict`, so nothing is saved.
    """

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self.persistent = persistent
        self.register_buffer("task_ids", torch.zeros(0, dtype=torch.long), persistent=persistent)
        self.register_buffer("reference", torch.zeros(0), persistent=persistent)
        self.register_buffer("reference_index", torch.zeros(0, dtype=torch.int32), persistent=persistent)
        self.register_buffer("reference_kind", torch.zeros((), dtype=torch.long), persistent=persistent)
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long), persistent=persistent)
        self._has_labels = False
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.long), persistent=persistent)
        self.register_buffer("scale", torch.ones(()), persistent=persistent)

    @property
    def input_names(self) -> list[str]:
        return [name.removeprefix(ANCHOR_PREFIX) for name, _ in self.named_buffers() if name.startswith(ANCHOR_PREFIX)]

    @property
    def inputs(self) -> AnchorInputs:
        return {name: getattr(self, ANCHOR_PREFIX + name) for name in self.input_names}

    @property
    def num_tasks(self) -> int:
        return int(self.task_ids.max()) + 1 if len(self) else 0

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])

    @property
    def has_labels(self) -> bool:
        """Whether any anchor has a label (the FIP step's label term needs one). Read from the host copy kept by
        `replace`, so the FIP step does not wait on the device to ask."""
        return self._has_labels

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # a plain `load_state_dict` fills the buffers in place
        self._has_labels = bool((self.labels != NO_LABEL).any()) if self.labels.numel() else False

    @property
    def reference_mode(self) -> str:
        """How this memory keeps its references: "full", "top_k" or "recompute" (see the module docstring)."""
        return REFERENCE_KINDS[int(self.reference_kind)]

    def anchors_per_task(self) -> list[int]:
        return torch.bincount(self.task_ids, minlength=self.num_tasks).tolist() if len(self) else []

    def with_new_task(
        self, new_inputs: AnchorInputs, budget: int, new_labels: torch.Tensor | None = None
    ) -> tuple[AnchorInputs, torch.Tensor, torch.Tensor]:
        """Anchors, task ids and labels after adding `new_inputs` (labelled by `new_labels`, or not) as a new task,
        old tasks sharing the rest of `budget`.

        Anchors within a task are stored in random order, so keeping each old task's first rows keeps a random
        subset of it. Nothing is changed here; `replace` commits the result.
        """
        old_tasks = self.num_tasks
        num_new = num_rows(new_inputs)
        per_old_task = (budget - num_new) // old_tasks if old_tasks else 0
        keep = torch.cat(
            [torch.nonzero(self.task_ids == t).flatten()[:per_old_task] for t in range(old_tasks)]
            + [torch.zeros(0, dtype=torch.long, device=self.task_ids.device)]
        )
        parts = []
        if old_tasks:
            parts.append({k: v.cpu() for k, v in select_rows(self.inputs, keep).items()})
        parts.append(new_inputs)
        task_ids = torch.cat([self.task_ids[keep].cpu(), torch.full((num_new,), old_tasks, dtype=torch.long)])
        old_labels = self.labels[keep].cpu() if self.labels.shape[0] == len(self) else unlabelled(len(keep))
        new_labels = unlabelled(num_new) if new_labels is None else new_labels.cpu().long()
        if old_labels.dim() != new_labels.dim() and not (old_labels != NO_LABEL).any():
            old_labels = torch.full((len(keep), *new_labels.shape[1:]), NO_LABEL, dtype=torch.long)
        elif old_labels.dim() != new_labels.dim() and not (new_labels != NO_LABEL).any():
            new_labels = torch.full((num_new, *old_labels.shape[1:]), NO_LABEL, dtype=torch.long)
        if old_labels.dim() != new_labels.dim():  # token labels beside example labels: neither can be used as such
            raise ValueError(
                f"`remember` got labels of shape {tuple(new_labels.shape)} (per "
                f"{'example' if new_labels.dim() == 1 else 'token'}) but earlier anchors have labels per "
                f"{'example' if old_labels.dim() == 1 else 'token'}; pass the same kind of labels to every call."
            )
        return concat_inputs(parts), task_ids, pad_labels([old_labels, new_labels])

    def replace(
        self,
        inputs: AnchorInputs,
        task_ids: torch.Tensor,
        reference: torch.Tensor | TopKReference | None,
        scale: float = 1.0,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Commit a new set of anchors, reference outputs (a tensor in full, a `TopKReference`, or None: recomputed
        at each step), labels (None: no label) and the distance scale at once."""
        device = self.task_ids.device
        for name in self.input_names:
            delattr(self, ANCHOR_PREFIX + name)
        for name, value in inputs.items():
            self.register_buffer(ANCHOR_PREFIX + name, value.to(device), persistent=self.persistent)
        self.task_ids = task_ids.to(device)
        if isinstance(reference, TopKReference):
            kind, index, reference = "top_k", reference.index.to(torch.int32), reference.logprobs
        elif reference is None:
            kind, index, reference = "recompute", None, torch.zeros(task_ids.shape[0], 0)
        else:
            kind, index = "full", None
        self.reference = reference.to(device)
        self.reference_index = (torch.zeros(0, dtype=torch.int32) if index is None else index).to(device)
        self.reference_kind.fill_(REFERENCE_KINDS.index(kind))
        self.labels = (unlabelled(task_ids.shape[0]) if labels is None else labels.long()).to(device)
        self._has_labels = bool((self.labels != NO_LABEL).any()) if self.labels.numel() else False
        self.scale.fill_(scale)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the memory from saved buffers (`name -> tensor`, names as in `state_dict`)."""
        inputs = {k.removeprefix(ANCHOR_PREFIX): v for k, v in tensors.items() if k.startswith(ANCHOR_PREFIX)}
        if not inputs and "task_ids" in tensors and tensors["task_ids"].numel() == 0:
            self.clear()
            return
        missing = {"task_ids", "reference"} - set(tensors)
        if missing or not inputs:
            raise ValueError(f"The saved FIP anchor memory is incomplete: missing {sorted(missing) or 'anchors'}.")
        if num_rows(inputs) != tensors["task_ids"].shape[0] or tensors["reference"].shape[0] != num_rows(inputs):
            raise ValueError("The saved FIP anchor memory is inconsistent: anchors and references differ in count.")
        labels = tensors.get("labels")  # adapters saved before labels travelled with anchors have none
        if labels is not None and labels.shape[:1] != tensors["task_ids"].shape[:1]:
            raise ValueError("The saved FIP anchor memory is inconsistent: anchors and labels differ in count.")
        kind = int(tensors["reference_kind"]) if "reference_kind" in tensors else 0  # older adapters: in full
        if not 0 <= kind < len(REFERENCE_KINDS):
            raise ValueError(f"The saved FIP anchor memory has an unknown reference_kind {kind}.")
        reference: torch.Tensor | TopKReference | None = tensors["reference"]
        if REFERENCE_KINDS[kind] == "top_k":
            index = tensors.get("reference_index")
            if index is None or index.shape[:-1] != tensors["reference"].shape[:-1]:
                raise ValueError(
                    "The saved FIP anchor memory is inconsistent: top-k references without their indices."
                )
            reference = TopKReference(tensors["reference"], index)
        elif REFERENCE_KINDS[kind] == "recompute":
            reference = None
        self.replace(inputs, tensors["task_ids"].long(), reference, float(tensors.get("scale", 1.0)), labels)
        if "sample_step" in tensors:
            self.sample_step.fill_(int(tensors["sample_step"]))

    def clear(self) -> None:
        self.replace({}, torch.zeros(0, dtype=torch.long), torch.zeros(0))

    def next_batch_index(self, batch_size: int, seed: int) -> torch.Tensor:
        """Anchor indices for the next step: the same on every process, since they depend only on seed and step."""
        index = self.batch_index(batch_size, seed, int(self.sample_step))
        self.sample_step += 1
        return index

    def batch_index(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        """`batch_size` anchor indices drawn by `seed` and `step` alone (all anchors when there are no more)."""
        size = len(self)
        if batch_size >= size:
            return torch.arange(size)
        return torch.randperm(size, generator=generator(counter_seed(seed, step)))[:batch_size]

    def batch(self, index: torch.Tensor) -> tuple[AnchorInputs, torch.Tensor | TopKReference | None]:
        """Anchor inputs and reference outputs at `index`, trimmed of columns that are padding in every row: the
        references as a tensor (kept in full), a `TopKReference`, or None (`recompute`: the caller runs the base
        model)."""
        index = index.to(self.task_ids.device)
        inputs = select_rows(self.inputs, index)
        mode = self.reference_mode
        reference = self.reference[index]
        top_index = self.reference_index[index] if mode == "top_k" else None
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            length = int(mask.sum(dim=1).max())
            if length < mask.shape[1] and not mask[:, length:].any():
                full = mask.shape[1]
                inputs = {k: v[:, :length] if v.dim() >= 2 and v.shape[1] == full else v for k, v in inputs.items()}
                if reference.dim() >= 3 and reference.shape[1] == full:
                    reference = reference[:, :length]
                    top_index = top_index[:, :length] if top_index is not None else None
        if mode == "recompute":
            return inputs, None
        if top_index is not None:
            return inputs, TopKReference(reference, top_index)
        return inputs, reference


def unlabelled(rows: int) -> torch.Tensor:
    """Labels of `rows` anchors that have none."""
    return torch.full((rows,), NO_LABEL, dtype=torch.long)


def resolve_reference_mode(config, output_shape: torch.Size) -> str:
    """The reference mode `remember` uses for outputs of shape (N, ..., C) under `config` (a `FIPConfig`):
    `reference_mode` itself, or for "auto" "top_k" where a softmax distance compares many classes (more than 4 x
    `reference_top_k`: a language model's vocabulary) and "full" elsewhere. Refuses a top-k that keeps every class."""
    mode = config.reference_mode
    classes = int(output_shape[-1]) if len(output_shape) >= 2 else 1
    if mode == "auto":
        softmax = config.distance in ("kl", "bhattacharyya") and config.anchor_output_module is None
        projection = isinstance(config.solver, str) and config.solver.startswith("projection")
        return "top_k" if softmax and not projection and classes > 4 * config.reference_top_k else "full"
    if mode == "top_k" and config.reference_top_k >= classes:
        raise ValueError(
            f"FIPConfig.reference_top_k={config.reference_top_k} keeps every one of the model's {classes} output "
            f"classes; set reference_top_k below {classes}, or reference_mode='full' (as small)."
        )
    return mode


def reference_bytes(num_anchors: int, output_shape: torch.Size, mode: str, top_k: int) -> int:
    """Bytes the references of `num_anchors` anchors take when kept as `mode` ("full", "top_k", "recompute"), from
    the outputs' shape (N, ..., C): float32 in full; k + 1 float32 log-probabilities and k int32 indices per position
    for top-k; nothing when recomputed."""
    per_anchor = int(torch.Size(output_shape[1:]).numel())
    if mode == "recompute":
        return 0
    if mode == "top_k":
        positions = per_anchor // max(int(output_shape[-1]), 1)
        return num_anchors * positions * ((top_k + 1) * 4 + top_k * 4)
    return num_anchors * per_anchor * 4


def check_reference_size(num_anchors: int, output_shape: torch.Size, mode: str = "full", top_k: int = 0) -> None:
    """Refuse reference outputs too big to keep (e.g. per-token logits over a large vocabulary kept in full)."""
    size = reference_bytes(num_anchors, output_shape, mode, top_k)
    if size > MAX_REFERENCE_BYTES:
        fix = (
            "set FIPConfig.reference_mode='top_k' with distance='kl' (top-k log-probabilities, a few percent of the "
            "size) or reference_mode='recompute' (nothing stored), lower FIPConfig.anchor_budget, or pass shorter "
            "anchors"
            if mode == "full"
            else "lower FIPConfig.reference_top_k or FIPConfig.anchor_budget, or pass shorter anchors"
        )
        raise ValueError(
            f"Reference outputs for {num_anchors} anchors of output shape {tuple(output_shape[1:])} kept as "
            f"reference_mode={mode!r} would take {size / 1024**3:.1f} GiB (the limit is "
            f"{MAX_REFERENCE_BYTES / 1024**3:.0f} GiB); {fix}."
        )
