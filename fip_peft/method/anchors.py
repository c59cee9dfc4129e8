"""Turn what users pass to `remember` (tensor, dict, `datasets.Dataset`, `DataLoader`, raw text with a tokenizer) into
anchor tensors.

Anchors are kept as a dict of batched tensors keyed by the model's input names; a plain tensor for a custom
`nn.Module` is stored under `POSITIONAL` and passed as the first positional argument.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from .model_io import forward_input_names

POSITIONAL = "_positional"
LABEL_KEYS = ("labels", "label", "label_ids", "targets")
# A DataLoader is read up to this many times the anchors wanted, then subsampled, so unshuffled loaders still
# give anchors from more than their first batches.
MAX_LOADER_OVERSAMPLING = 8

AnchorInputs = dict[str, torch.Tensor]


def pad_and_stack(tensors: list[torch.Tensor], value: int = 0) -> torch.Tensor:
    """Concatenate along dim 0, right-padding every other dim with `value` (zeros) to the largest size."""
    if len({t.dim() for t in tensors}) != 1:
        raise ValueError(f"Anchors of different ranks cannot be combined: {[tuple(t.shape) for t in tensors]}.")
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"Anchors of different dtypes cannot be combined: {sorted({str(t.dtype) for t in tensors})}.")
    sizes = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.dim())):
            pad += [0, sizes[d - 1] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad, value=value) if any(pad) else t)
    return torch.cat(padded, dim=0)


def concat_inputs(parts: list[AnchorInputs]) -> AnchorInputs:
    """Concatenate several anchor dicts that share the same keys."""
    keys = set(parts[0])
    for part in parts[1:]:
        if set(part) != keys:
            raise ValueError(
                f"Anchors must always have the same input names; got {sorted(keys)} and {sorted(part)}. Pass the "
                "same kind of data (tensor or the same dict keys) to every `remember` call."
            )
    for key in keys:
        check_unmasked_lengths(key, [part[key] for part in parts], "attention_mask" in keys)
    return {key: pad_and_stack([part[key] for part in parts]) for key in parts[0]}


def check_unmasked_lengths(name: str, tensors: list[torch.Tensor], masked: bool) -> None:
    """Refuse integer sequences (token ids) of different lengths without an `attention_mask`: right-padding them with
    zeros would feed the model pad tokens it attends to, and change the outputs recorded for the earlier anchors."""
    if masked:
        return
    lengths = sorted({t.shape[1] for t in tensors if t.dim() >= 2 and not (t.is_floating_point() or t.is_complex())})
    if len(lengths) > 1:
        label = "The positional anchor input" if name == POSITIONAL else f"Anchor input {name!r}"
        raise ValueError(
            f"{label} holds integer sequences of different lengths ({lengths[:4]}) and there is no `attention_mask`: "
            "padding them with zeros would feed the model pad tokens it attends to, and change the outputs recorded "
            "for earlier anchors. Pass the tokenizer's `attention_mask` with the ids (in every `remember` call), or "
            "pad all anchors to one length yourself."
        )


def num_rows(inputs: AnchorInputs) -> int:
    return next(iter(inputs.values())).shape[0] if inputs else 0


def select_rows(inputs: AnchorInputs, index: torch.Tensor) -> AnchorInputs:
    return {key: value[index] for key, value in inputs.items()}


def _batch_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """`value` detached on the CPU, once it is a tensor `remember` can store: dense, with data, real, with a batch
    dimension (`ValueError`/`TypeError` naming the input otherwise, rather than torch's own error from deep inside)."""
    label = "The positional anchor input" if name == POSITIONAL else f"Anchor input {name!r}"
    if value.layout != torch.strided:
        raise TypeError(f"{label} is a {value.layout} tensor; pass a dense tensor (`.to_dense()`).")
    if value.is_meta:
        raise ValueError(f"{label} is on the meta device and holds no data; pass tensors with values.")
    if value.is_complex():
        raise TypeError(f"{label} has the complex dtype {value.dtype}; pass real-valued inputs.")
    if value.dim() == 0:
        raise ValueError(
            f"{label} is a 0-dimensional tensor ({value.item()!r}); anchors are a batch: pass a tensor whose first "
            "dimension indexes the examples (e.g. `x.unsqueeze(0)` for a single example)."
        )
    return value.detach().cpu()


def _as_tensor(name: str, values: object, masked: bool = True) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return _batch_tensor(name, values)
    try:
        rows = [torch.as_tensor(v) for v in values]  # type: ignore[union-attr]
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"Anchor input {name!r} cannot be turned into a tensor: {error}") from error
    if not rows:
        return torch.empty(0)
    rows = [row.unsqueeze(0) for row in rows]
    check_unmasked_lengths(name, rows, masked)
    return pad_and_stack(rows)


def _from_mapping(batch: Mapping, model_inputs: set[str] | None) -> AnchorInputs:
    inputs = {}
    for key, value in batch.items():
        if key in LABEL_KEYS or (model_inputs is not None and key not in model_inputs):
            continue
        inputs[key] = _as_tensor(key, value, masked="attention_mask" in batch)
    if not inputs:
        wanted = f" The model takes {sorted(model_inputs)}." if model_inputs else ""
        raise ValueError(f"`remember` found no model inputs among the data's fields {sorted(batch)}.{wanted}")
    sizes = {key: value.shape[0] for key, value in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"All anchor inputs must have the same number of rows, got {sizes}.")
    return inputs


def _from_batch(batch: object, model_inputs: set[str] | None) -> AnchorInputs:
    if isinstance(batch, torch.Tensor):
        return {POSITIONAL: _batch_tensor(POSITIONAL, batch)}
    if isinstance(batch, Mapping):
        return _from_mapping(batch, model_inputs)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return {POSITIONAL: _batch_tensor(POSITIONAL, batch[0])}
    raise TypeError(
        f"`remember` cannot use a batch of type {type(batch).__name__}; pass a tensor, a dict of batched tensors, a "
        "datasets.Dataset or a DataLoader yielding tensors, (inputs, labels) tuples or dicts."
    )


def _several_batches(data: object) -> list | None:
    """`data` as a list of batches when it is a list or tuple of several of them: dicts, or tensors that all have the
    same dtype and per-example shape (`[b1, b2, b3]`). None when it reads as one `(inputs, labels, ...)` batch
    (tensors of different dtypes or shapes, as inputs and their labels are), which `_from_batch` takes."""
    if not isinstance(data, (list, tuple)) or len(data) < 2:
        return None
    if all(isinstance(batch, Mapping) for batch in data):
        return list(data)
    if all(isinstance(batch, torch.Tensor) for batch in data):
        first = data[0]
        if all(b.dtype == first.dtype and b.dim() == first.dim() > 0 and b.shape[1:] == first.shape[1:] for b in data):
            return list(data)
    return None


def collect_inputs(
    data: object, model: nn.Module, num_anchors: int, generator: torch.Generator | None = None
) -> AnchorInputs:
    """Read up to `num_anchors` anchor inputs from `data`, drawn at random when there are more."""
    return collect_anchors(data, model, num_anchors, generator)[0]


def collect_anchors(
    data: object,
    model: nn.Module,
    num_anchors: int,
    generator: torch.Generator | None = None,
    labels: object = None,
) -> tuple[AnchorInputs, torch.Tensor | None]:
    """Up to `num_anchors` anchor inputs from `data`, drawn at random when there are more, and their labels: those
    given as `labels` (one per example of `data`), else the data's own label field or column (`LABEL_KEYS`, the
    second element of `(inputs, labels)` batches), else None."""
    model_inputs = forward_input_names(model)
    if _is_hf_dataset(data):
        columns = [c for c in data.column_names if c not in LABEL_KEYS and c in model_inputs]
        if not columns:
            raise ValueError(
                f"`remember` found none of the model's inputs {sorted(model_inputs)} among the dataset "
                f"columns {data.column_names}; tokenize the dataset first (e.g. `dataset.map(tokenizer, ...)`)."
            )
        if len(data) == 0:
            raise ValueError("`remember` got an empty dataset; pass at least one example.")
        given = _given_labels(labels, len(data))
        label_column = next((c for c in LABEL_KEYS if c in data.column_names), None)
        if len(data) > num_anchors:
            keep = torch.randperm(len(data), generator=generator)[:num_anchors]
            data = data.select(keep.tolist())
            given = given[keep] if given is not None else None
        if given is None and label_column is not None:
            given = _labels_tensor(data[label_column])
        return _from_mapping(data.select_columns(columns)[:], None), given
    if isinstance(data, DataLoader):
        parts, label_parts, rows = [], [], 0
        for batch in data:
            part = _from_batch(batch, model_inputs)
            parts.append(part)
            label_parts.append(_batch_labels(batch))
            rows += num_rows(part)
            if rows >= MAX_LOADER_OVERSAMPLING * num_anchors:
                break
        if not parts:
            raise ValueError("`remember` got an empty DataLoader; pass at least one batch.")
        inputs = concat_inputs(parts)
        found = None if any(p is None for p in label_parts) else pad_labels(label_parts)
    elif (batches := _several_batches(data)) is not None:
        inputs = concat_inputs([_from_batch(batch, model_inputs) for batch in batches])
        label_parts = [_batch_labels(batch) for batch in batches]
        found = None if labels is not None or any(p is None for p in label_parts) else pad_labels(label_parts)
    else:
        inputs = _from_batch(data, model_inputs)
        found = _batch_labels(data) if labels is None else None
    total = num_rows(inputs)
    if total == 0:
        raise ValueError("`remember` got empty data; pass at least one example.")
    if labels is not None:
        found = _given_labels(labels, total)
    elif found is not None and (found.dim() == 0 or found.shape[0] != total):
        found = None  # a label field that is not one label per example (e.g. read past the oversampling limit)
    if total > num_anchors:
        keep = torch.randperm(total, generator=generator)[:num_anchors]
        inputs = select_rows(inputs, keep)
        found = found[keep] if found is not None else None
    return inputs, found


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_text(data: object) -> bool:
    """Whether `data` is raw text: a str, or a non-empty list or tuple of str."""
    return isinstance(data, str) or (
        isinstance(data, (list, tuple)) and bool(data) and all(isinstance(item, str) for item in data)
    )


def text_windows(texts: str | list[str], tokenizer, max_length: int | None) -> AnchorInputs:
    """Raw text as anchors of a language model: every text tokenized (without special tokens, then the tokenizer's
    end-of-sequence token where it has one, so that documents stay apart), the tokens of all texts joined and cut
    into windows of `max_length` tokens, as language-model pretraining packs text. The last, shorter window is
    right-padded (`attention_mask` 0 there), so no token is lost and none is made up."""
    if tokenizer is None:
        raise ValueError(
            "`remember` got raw text but no `tokenizer`: pass `tokenizer=` (the model's tokenizer, e.g. "
            "`AutoTokenizer.from_pretrained(...)`) and `max_length=` (tokens per anchor window), or tokenize the "
            "text yourself and pass the token tensors."
        )
    if not _is_int(max_length) or max_length < 1:
        raise ValueError(
            f"`remember` got raw text with max_length={max_length!r}; pass `max_length=` as an int >= 1, the tokens "
            "per anchor window (e.g. max_length=128)."
        )
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not callable(tokenizer):
        raise TypeError(
            f"`tokenizer` must be a callable tokenizer (a transformers tokenizer), got {type(tokenizer).__name__}."
        )
    encoded = tokenizer(texts, add_special_tokens=False)
    rows = encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else None
    if rows is None or len(rows) != len(texts):
        raise TypeError(
            "`tokenizer(texts)` must return a mapping with 'input_ids', one list of ids per text, as transformers "
            f"tokenizers do; got {type(encoded).__name__}."
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    tokens = [int(t) for row in rows for t in [*list(row), *([eos] if _is_int(eos) else [])]]
    if not tokens:
        raise ValueError("`remember` got raw text with no tokens (empty strings); pass text to remember.")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if _is_int(pad) else (eos if _is_int(eos) else 0)
    count = -(-len(tokens) // max_length)
    ids = torch.full((count * max_length,), int(pad), dtype=torch.long)
    ids[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    mask = torch.zeros(count * max_length, dtype=torch.long)
    mask[: len(tokens)] = 1
    return {"input_ids": ids.reshape(count, max_length), "attention_mask": mask.reshape(count, max_length)}


def _given_labels(labels: object, total: int) -> torch.Tensor | None:
    """`remember(labels=...)` as a tensor of one label per example of the data (`total`), or None."""
    if labels is None:
        return None
    tensor = _labels_tensor(labels)
    if tensor.dim() == 0 or tensor.shape[0] != total:
        raise ValueError(
            f"`labels` must hold one label per example of `data` ({total}), got shape {tuple(tensor.shape)}."
        )
    return tensor


def _labels_tensor(values: object) -> torch.Tensor:
    """Labels as an integer tensor (class indices; -100 marks a position without a label, as in transformers)."""
    try:
        tensor = values.detach().cpu() if isinstance(values, torch.Tensor) else _as_tensor("labels", values)
    except TypeError as error:
        raise TypeError(f"`labels` must be class indices (integers), got {type(values).__name__}: {error}") from error
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"`labels` must be integer class indices (-100 for none), got dtype {tensor.dtype}; FIP's label term is a "
            "cross-entropy on the anchors' logits."
        )
    return tensor.long()


def _batch_labels(batch: object) -> torch.Tensor | None:
    """The labels a batch carries: a mapping's label field or the second element of an `(inputs, labels)` pair."""
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        return _labels_tensor(batch[key]) if key is not None else None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return _labels_tensor(batch[1])
    return None


def pad_labels(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate label tensors along dim 0, right-padding token labels with -100 (no label)."""
    return pad_and_stack([t.long() for t in parts], value=-100)


def _is_hf_dataset(data: object) -> bool:
    try:
        from datasets import Dataset
    except ImportError:
        return False
    return isinstance(data, Dataset)


def transform_anchors(transform, inputs: AnchorInputs) -> AnchorInputs:
    """`transform` applied to a batch of anchors as `remember` was given them: the tensor of a custom module's
    anchors, else the dict of the model's input tensors (e.g. `{"pixel_values": ...}`). It must return the same kind,
    with as many rows (a fresh augmentation of each anchor, as DER augments its buffer at every step)."""
    positional = set(inputs) == {POSITIONAL}
    rows = num_rows(inputs)
    out = transform(inputs[POSITIONAL] if positional else dict(inputs))
    if positional and isinstance(out, torch.Tensor):
        out = {POSITIONAL: out}
    if not isinstance(out, Mapping) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        wanted = "a tensor" if positional else "a dict of tensors"
        raise TypeError(f"`anchor_transform` must return {wanted}, as it was given, got {type(out).__name__}.")
    if set(out) != set(inputs) or any(v.shape[:1] != (rows,) for v in out.values()):
        given = tuple(out[POSITIONAL].shape) if positional else {k: tuple(v.shape) for k, v in out.items()}
        wanted = "a tensor" if positional else f"the inputs {sorted(inputs)}"
        raise ValueError(f"`anchor_transform` must return {wanted} with {rows} rows, as it was given; got {given}.")
    return dict(out)
