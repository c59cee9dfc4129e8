"""Compact references (issue 27): storage, time and how well each `FIPConfig.reference_mode` keeps a causal LM.

Benchmark code, not part of the package. A tiny GPT-2 from config (its final norm scaled so that its next-token
distributions are peaked like a trained LM's) remembers anchors of random tokens, then learns a new task (a repeating
token pattern) under FIP with each reference mode. Reported per mode: the bytes its references take, the time of
`remember` and of a training step, and the forgetting it allows: the full next-token KL(p_base || p) on the anchors
after training (what every mode approximates, measured exactly), beside the new task's loss.

    python benchmarks/compact_references.py            # the run in docs/benchmarks.md
    python benchmarks/compact_references.py --steps 5  # a quick check
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import fip_peft
from fip_peft.math.distances import functional_distance


def tiny_lm(vocab: int, peak: float) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=vocab, n_positions=128, bos_token_id=0, eos_token_id=1
    )
    model = GPT2LMHeadModel(config)
    model.transformer.ln_f.weight.data *= peak
    return model.eval()


def full_kl(model, base_logits: torch.Tensor, anchors: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        logits = model(**anchors).logits
    return float(functional_distance(logits, base_logits, "kl", anchors["attention_mask"]))


def run(mode: str, k: int, args, anchors, task, base_logits) -> dict[str, float]:
    config = fip_peft.FIPConfig(
        task_type="CAUSAL_LM", distance="kl", rank=8, reference_mode=mode, reference_top_k=k,
        anchor_batch_size=args.anchor_batch_size, beta=args.beta,
    )  # fmt: skip
    model = get_peft_model(tiny_lm(args.vocab, args.peak), config)
    start = time.perf_counter()
    model.remember(anchors)
    remember_s = time.perf_counter() - start
    memory = model.base_model.memory()
    stored = memory.reference.numel() * memory.reference.element_size()
    stored += memory.reference_index.numel() * memory.reference_index.element_size()
    optimizer = fip_peft.create_fip_optimizer(model, torch.optim.AdamW, lr=args.lr)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        batch = task[(step * 8) % len(task) :][:8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    step_ms = 1000 * (time.perf_counter() - start) / max(args.steps, 1)
    model.eval()
    with torch.no_grad():
        task_loss = float(model(input_ids=task[:16], labels=task[:16]).loss)
    return {
        "stored_MiB": stored / 2**20,
        "remember_s": remember_s,
        "step_ms": step_ms,
        "full_kl_after": full_kl(model, base_logits, anchors),
        "task_loss": task_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--peak", type=float, default=20.0, help="scale of the final norm (peaked distributions)")
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--anchor-batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, args.vocab, (args.anchors, args.length), generator=generator)
    mask = torch.ones_like(ids)
    mask[::4, args.length * 3 // 4 :] = 0
    anchors = {"input_ids": ids, "attention_mask": mask}
    pattern = torch.randint(2, args.vocab, (64, 8), generator=generator)
    task = pattern.repeat(1, args.length // 8)
    base = tiny_lm(args.vocab, args.peak)
    with torch.no_grad():
        base_logits = base(**anchors).logits
        top = base_logits.softmax(-1).topk(max(args.top_k), dim=-1).values.sum(-1)
    print(f"vocab {args.vocab}, {args.anchors} anchors x {args.length} tokens, {args.steps} steps; reference mass "
          f"in the top {max(args.top_k)}: {float(top[mask.bool()].mean()):.3f}")  # fmt: skip
    plain = run("full", 1, argparse.Namespace(**{**vars(args), "beta": 1e9}), anchors, task, base_logits)
    print(f"{'mode':<14}{'stored MiB':>11}{'remember s':>11}{'step ms':>9}{'full KL after':>14}{'task loss':>10}")
    rows = [("no anchors*", plain), ("full", run("full", 1, args, anchors, task, base_logits))]
    rows += [(f"top_k k={k}", run("top_k", k, args, anchors, task, base_logits)) for k in args.top_k]
    rows.append(("recompute", run("recompute", 1, args, anchors, task, base_logits)))
    for name, r in rows:
        print(f"{name:<14}{r['stored_MiB']:>11.2f}{r['remember_s']:>11.2f}{r['step_ms']:>9.1f}"
              f"{r['full_kl_after']:>14.4f}{r['task_loss']:>10.3f}")  # fmt: skip
    print("* beta=1e9: the anchors' term has no weight (plain fine-tuning of the same adapter)")


if __name__ == "__main__":
    main()
