"""`AnchorMemory`: the anchors X_a of one adapter and the reference outputs f(X_a; w_ref) recorded on them.

It is an `nn.Module` whose tensors are buffers, so it lives on the model's device and, when the config says
`save_anchors=True`, travels inside `adapter_model.safetensors`.
"""

from __future__ import annotations

import torch
from torch import nn

from .anchors import AnchorInputs, concat_inputs, num_rows, pad_labels, select_rows
from .seeds import counter_seed, generator

ANCHOR_PREFIX = "anchor__"
NO_LABEL = -100  # as transformers' ignore_index: an anchor (or a token of one) without a label
MAX_REFERENCE_BYTES = 2 * 1024**3


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
        reference: torch.Tensor,
        scale: float = 1.0,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Commit a new set of anchors, reference outputs, labels (None: no label) and the distance scale at once."""
        device = self.task_ids.device
        for name in self.input_names:
            delattr(self, ANCHOR_PREFIX + name)
        for name, value in inputs.items():
            self.register_buffer(ANCHOR_PREFIX + name, value.to(device), persistent=self.persistent)
        self.task_ids = task_ids.to(device)
        self.reference = reference.to(device)
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
        self.replace(
            inputs, tensors["task_ids"].long(), tensors["reference"], float(tensors.get("scale", 1.0)), labels
        )
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

    def batch(self, index: torch.Tensor) -> tuple[AnchorInputs, torch.Tensor]:
        """Anchor inputs and reference outputs at `index`, trimmed of columns that are padding in every row."""
        index = index.to(self.task_ids.device)
        inputs = select_rows(self.inputs, index)
        reference = self.reference[index]
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            length = int(mask.sum(dim=1).max())
            if length < mask.shape[1] and not mask[:, length:].any():
                full = mask.shape[1]
                inputs = {k: v[:, :length] if v.dim() >= 2 and v.shape[1] == full else v for k, v in inputs.items()}
                if reference.dim() >= 3 and reference.shape[1] == full:
                    reference = reference[:, :length]
        return inputs, reference


def unlabelled(rows: int) -> torch.Tensor:
    """Labels of `rows` anchors that have none."""
    return torch.full((rows,), NO_LABEL, dtype=torch.long)


def check_reference_size(num_anchors: int, output_shape: torch.Size) -> None:
    """Refuse reference outputs too big to keep (e.g. per-token logits over a large vocabulary)."""
    size = num_anchors * int(torch.Size(output_shape[1:]).numel()) * 4
    if size > MAX_REFERENCE_BYTES:
        raise ValueError(
            f"Reference outputs for {num_anchors} anchors of output shape {tuple(output_shape[1:])} would take "
            f"{size / 1024**3:.1f} GiB; lower FIPConfig.anchor_budget or pass shorter anchors."
        )
