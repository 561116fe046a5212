#!/usr/bin/env bash
# The embedded engine's speculation limits on both instruction-set paths of one machine (issue 19):
# the default against other draft batch limits and draft lengths, side by side in one run per path,
# on an idle machine (~25 minutes). Writes benchmarks/results/engine_limits[-avx2].json.
#
#   bash benchmarks/limits_sweep.sh [native] [avx2]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
source benchmarks/paths.sh
variants=embedded-plain,embedded,embedded:draft_max_batch=0,embedded:draft_max_batch=2,embedded:draft_max_batch=8,embedded:speculate=6
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(native avx2)
for path in "${paths[@]}"; do
  hold "$path"
  echo "== $(date -u +%FT%TZ) $path: speculation limits"
  env "${held[@]}" $PY benchmarks/engines.py --engines "$variants" --repeats 2 --name engine_limits
done
echo "== $(date -u +%FT%TZ) done"
