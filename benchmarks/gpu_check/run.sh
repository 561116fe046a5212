#!/usr/bin/env bash
# The distributed-training path on a GPU: torchrun + NCCL + DDP + bf16, configuration only.
# lm/training.py runs as a script here (it needs torch, transformers and rich alone); run from
# the repository root after benchmarks/gpu_check/prepare.py .device: bash .device/run.sh
set -x
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
for cfg in full lora_ckpt; do
  python3 ../lm/training.py tiny-model records.jsonl /tmp/gpu-runs/plain-$cfg --settings $cfg.json || exit 1
  python3 -m torch.distributed.run --standalone --nproc-per-node 1 ../lm/training.py tiny-model records.jsonl \
      /tmp/gpu-runs/torchrun-$cfg --settings $cfg.json || exit 1
  python3 -m accelerate.commands.launch --num_processes 1 ../lm/training.py tiny-model records.jsonl \
      /tmp/gpu-runs/accelerate-$cfg --settings $cfg.json || echo "accelerate launch failed"
done
python3 - <<'PY'
import json, os
out = "/tmp/gpu-runs"
for run in sorted(os.listdir(out)):
    s = json.load(open(f"{out}/{run}/train_summary.json"))
    log = [json.loads(l) for l in open(f"{out}/{run}/train_log.jsonl")]
    print(run, "device", s["device"], "bf16", s["bf16"], "world", s["world_size"], "steps", s["steps"],
          "first/last loss %.4f/%.4f" % (log[0]["loss"], log[-1]["loss"]), "peak cuda GiB %.3f" % s["peak_cuda_gib"],
          "tok/s %.0f" % s["tokens_per_second"])
PY
