"""Prepare the GPU check: a tiny model (the real tokenizer, 64-wide, one 64-wide head), ground-truth
chat records and two training configurations, into a folder that travels to the GPU machine.

    .venv/bin/python benchmarks/gpu_check/prepare.py .device     # then, there: bash .device/run.sh
"""

import json
import shutil
import sys
from pathlib import Path

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

from misstep.lm import build_tiny_model
from misstep.optimize.demos import ground_truth_chat_data, ground_truth_demos
from misstep.programs import SelfCorrector

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".device")
build_tiny_model(out / "tiny-model", hidden_size=64, layers=2, heads=1)  # ~16 MB with the tokenizer
chains = misstep.load_chains(misstep.sample_path("gsm8k/train.jsonl"))
records = ground_truth_chat_data(SelfCorrector(), ground_truth_demos(chains, k=8))
(out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
configs = {
    "full": dict(method="full", learning_rate=1e-3, batch_size=4, max_length=512),
    "lora_ckpt": dict(method="lora", learning_rate=1e-3, batch_size=4, max_length=512, gradient_checkpointing=True),
}
for name, settings in configs.items():
    (out / f"{name}.json").write_text(json.dumps(settings))
shutil.copy(Path(__file__).parent / "run.sh", out / "run.sh")
print(f"{out}: tiny model, {len(records)} records, configs {', '.join(configs)}")
