#!/usr/bin/env bash
# The embedded engine's speculation limits on both instruction-set paths of one machine (issue 19):
# the default against other draft batch limits and draft lengths, side by side in one run per path,
# on an idle machine (~25 minutes). Writes benchmarks/results/engine_limits[-avx2].json.
#
#   bash benchmarks/limits_sweep.sh [native] [avx2]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
variants=embedded-plain,embedded,embedded:draft_max_batch=0,embedded:draft_max_batch=2,embedded:draft_max_batch=8,embedded:speculate=6
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(native avx2)
for path in "${paths[@]}"; do
  case $path in
    native) held=() ;;
    avx2) held=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2) ;;
    *) echo "unknown path $path (native or avx2)" >&2; exit 2 ;;
  esac
  echo "== $(date -u +%FT%TZ) $path: speculation limits"
  env "${held[@]}" $PY benchmarks/engines.py --engines "$variants" --repeats 2 --name engine_limits
done
echo "== $(date -u +%FT%TZ) done"
