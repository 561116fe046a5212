#!/usr/bin/env bash
# The measurements still owed to open issues, one after another on the whole machine (two
# experiments side by side on two cores made each several times slower). Every step resumes from
# its files and skips what is finished, so after an interruption the same command goes on:
#
#   nohup bash scripts/experiments.sh >> runs/logs/experiments.log 2>&1 &
#
# Copy a committed partial file back under runs/ first where runs/ is gone (docs/constrained.md).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/logs
M=.venv/bin/misstep
GSM8K=../shared/data/gsm8k/test.jsonl
step() { echo "== $(date -u +%FT%TZ) $*"; }

step "issue 14: GSM8K unconstrained, the README's first command, both engines"
[ -f runs/issue14/evaluate-gsm8k-no-constrained/metrics.json ] || $M evaluate --data $GSM8K --limit 300 --no-recover --no-constrained \
  --run-dir runs/issue14/evaluate-gsm8k-no-constrained
[ -f runs/issue14/readme-first/summary.json ] || $M generate --chains 4 --run-dir runs/issue14/readme-first
VLLM_PYTHON=${VLLM_PYTHON:-/tmp/vvenv/bin/python}  # bash scripts/install.sh --vllm into MISSTEP_VENV=/tmp/vvenv
if [ -x "$VLLM_PYTHON" ] && [ ! -f benchmarks/results/engine_parity.json ]; then
  .venv/bin/python benchmarks/engine_parity.py --chains 20 --vllm-python "$VLLM_PYTHON"
fi

step "issue 13: the run chosen on the validation split (balanced positions, lr 1e-4, 1 epoch), on the test split; the learning curve"
$M control --size 1000 --cue real --learning-rate 1e-4 --epochs 1 --positions balanced \
  --run-dir runs/control --results docs/results/control.json
$M control --size 100 --size 300 --cue real --learning-rate 1e-4 --epochs 1 --positions balanced \
  --run-dir runs/control --results docs/results/control.json

step "issue 14: generate --chains 100 both ways"
$M generate --data $GSM8K --chains 100 --run-dir runs/issue14/generate-constrained
$M generate --data $GSM8K --chains 100 --no-constrained --run-dir runs/issue14/generate-unconstrained

step "issue 15: the arms side by side (configs/arms.toml)"
$M optimize --config configs/arms.toml --keep judge --keep oracle --keep random \
  --bbm-at-best logical_deduction --bbm-at-best multistep_arithmetic --bbm-at-best word_sorting \
  --run-dir runs/arms
step "done"
