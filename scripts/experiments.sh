#!/usr/bin/env bash
# The measurements still owed to open issues, one after another on the whole machine (two
# experiments side by side on two cores made each several times slower). Every step resumes from
# its files and skips what is finished or already committed, so after an interruption (or in a
# fresh checkout, where runs/ is gone) the same command goes on:
#
#   nohup bash scripts/experiments.sh >> runs/logs/experiments.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/logs
M=.venv/bin/misstep
GSM8K=../shared/data/gsm8k/test.jsonl
step() { echo "== $(date -u +%FT%TZ) $*"; }
recorded() { grep -q "\"$1\"" docs/results/control.json; }  # a control run already in the committed results

step "issue 13: the learning curve of the run chosen on validation (balanced positions, lr 1e-4, 1 epoch), on the test split"
for n in 100 300 1000; do
  recorded "real-n$n-lr0.0001-e1-stage3-s0" || $M control --size $n --cue real --learning-rate 1e-4 --epochs 1 \
    --positions balanced --run-dir runs/control --results docs/results/control.json
done

step "issue 14: generate --chains 100 both ways (results committed in docs/results/constrained/)"
for setting in constrained unconstrained; do
  flag=$([ $setting = constrained ] && echo --constrained || echo --no-constrained)
  partial=docs/results/constrained/generate-$setting.partial.jsonl  # what an earlier session got through
  if [ -f $partial ] && [ ! -f runs/issue14/generate-$setting/scenarios.jsonl ]; then
    mkdir -p runs/issue14/generate-$setting && cp $partial runs/issue14/generate-$setting/scenarios.jsonl
  fi
  [ -f docs/results/constrained/generate-$setting.summary.json ] || [ -f runs/issue14/generate-$setting/summary.json ] \
    || $M generate --data $GSM8K --chains 100 $flag --run-dir runs/issue14/generate-$setting
done

step "issue 14: what the constraint costs in decoding speed, both engines (alone on the machine)"
VLLM_PYTHON=${VLLM_PYTHON:-/tmp/vvenv/bin/python}  # MISSTEP_VENV=/tmp/vvenv bash scripts/install.sh --vllm
measured_both() { .venv/bin/python -c "import json,sys; sys.exit('vllm' not in json.load(open('$1')))"; }
measured_both benchmarks/results/constrained_speed.json || .venv/bin/python benchmarks/constrained_speed.py \
  --chains 2 --repeats 3 --vllm-python "$VLLM_PYTHON"

step "issue 14: the constraint's own cost, the same free text both ways (embedded engine, alone on the machine)"
[ -f benchmarks/results/constrained_speed_equal_text.json ] || .venv/bin/python benchmarks/constrained_speed.py \
  --engines embedded --equal-text --chains 2 --repeats 3

step "issue 15: can a LoRA adapter learn the cue (docs/control.md)?"
for lora in "0.001 8" "0.003 16"; do  # learning rate as the run's name writes it, rank
  set -- $lora
  recorded "cue-n1000-lr$1-e1-stage3-lora$2-s0" || $M control --size 1000 --cue cue --learning-rate $1 --epochs 1 --lora-rank $2 \
    --run-dir runs/control --results docs/results/control.json
done

step "issues 15, 18: is one real error type learnable alone, where the mix of five is not? (docs/control.md)"
recorded "real-n1000-lr0.0001-e1-stage3-misread_quantity-s0" || $M control --size 1000 --cue real \
  --learning-rate 1e-4 --epochs 1 --error-type misread_quantity --run-dir runs/control --results docs/results/control.json

step "issues 15, 18: the arms side by side (configs/arms.toml, LoRA adapters), the judge arm also on procedural seeds (the curriculum and uniform levels); its files travel between sessions in carried/arms (the first run, full fine-tunes: carried/arms-full-ft)"
[ -d runs/arms ] || [ ! -d carried/arms ] || .venv/bin/python scripts/carry_run.py restore carried/arms runs/arms
$M optimize --config configs/arms.toml --data ../shared/data/gsm8k/train.jsonl \
  --arm judge --arm oracle --arm random --arm judge-curriculum --arm judge-uniform --level 1 --level 3 --level 5 \
  --bbm-at-best logical_deduction --bbm-at-best multistep_arithmetic --bbm-at-best word_sorting \
  --run-dir runs/arms
step "done"
