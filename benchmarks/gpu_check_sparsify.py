"""GPU check of objective="sparsify" (tiny BERT built from a config, digits as tokens; no network, no packaged model):
a sparsifying walk with `create_fip_optimizer` and no task loss on the device, `merge_and_unload()` with exactly the
reported zeros, and `FIPTrainer` on a dataset without labels resumed from a checkpoint (same weights as uninterrupted).

    PYTHONPATH=. python benchmarks/gpu_check_sparsify.py          # DEV=cpu runs it on the CPU
"""

import os
import tempfile

import torch
from sklearn.datasets import load_digits

import fip_peft
from tests._tasks import as_tokens, sparsify_bert, sparsify_trainer

dev = os.environ.get("DEV", "cuda")
print(torch.__version__, dev, torch.cuda.get_device_name(0) if dev == "cuda" else "")
tokens = as_tokens(torch.tensor(load_digits().data[:64], dtype=torch.float32))


m = sparsify_bert(tokens, device=dev)
opt = fip_peft.create_fip_optimizer(m, torch.optim.AdamW, lr=1e-3)
for _ in range(6):
    opt.zero_grad()
    opt.step()
r = m.sparsity_report()
print("loop: sparsity", r["sparsity"], "step", r["step"], "D", opt.pop_mean_distance(), next(m.parameters()).device)
ids = {k: v[:8].to(dev) for k, v in tokens.items()}
m.eval()
before = m(**ids).logits
merged = m.merge_and_unload()
zeros = sum(int((mod.weight == 0).sum()) for n, mod in merged.named_modules() if n in r["layers"])
print(
    "merged zeros == report:",
    zeros == r["zeros"],
    "max logit diff",
    float((merged(**ids).logits - before).abs().max()),
)
rows = [{k: v[i].tolist() for k, v in tokens.items()} for i in range(64)]


def trainer(model, out, **kw):
    return sparsify_trainer(model, rows, out, use_cpu=dev == "cpu", **kw)


tmp = tempfile.mkdtemp()
a = sparsify_bert(tokens, device=dev)
trainer(a, tmp, save_strategy="steps", save_steps=2).train()
b = sparsify_bert(tokens, device=dev)
trainer(b, tmp + "/r").train(resume_from_checkpoint=tmp + "/checkpoint-2")
print(
    "trainer: sparsity",
    a.sparsity_report()["sparsity"],
    "steps",
    a.get_sparsity_step(),
    b.get_sparsity_step(),
    next(a.parameters()).device,
)
diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))
print("resume max diff", diff)
assert zeros == r["zeros"] and b.get_sparsity_step() == 4 and diff < 1e-6, "sparsify GPU check failed"
