#!/usr/bin/env bash
# Stop a long run where the least is lost, and carry its files for the next session.
#
#   bash scripts/pause_run.sh runs/arms carried/arms "stopped for the session's end; next: ..."
#
# A LoRA training in progress writes a resume point every few minutes (lm/training.py,
# resume_every_s): the script waits for the next one (at most WAIT_S seconds), so at most a step
# is trained again. Then it stops scripts/experiments.sh and the loop, says why in
# RUN_DIR/pauses.txt, and saves RUN_DIR to CARRIED (scripts/carry_run.py) for git to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=${1:?the run folder}
carried=${2:?the carried folder}
why=${3:?why the run stops, and what comes next}
WAIT_S=${WAIT_S:-660}

# A training is in progress where a log line was written in the last two minutes.
log=$(find "$run_dir/checkpoints" -name train_log.jsonl -mmin -2 2>/dev/null | head -1)
if [ -n "$log" ]; then
  resume=$(dirname "$log")/resume.pt
  since=$(date +%s)
  echo "waiting for $resume (at most ${WAIT_S}s)"
  while [ $(($(date +%s) - since)) -lt "$WAIT_S" ]; do
    if [ -f "$resume" ] && [ "$(stat -c %Y "$resume")" -ge "$since" ]; then
      sleep 5  # written whole (a rename), and let the step that follows begin
      break
    fi
    sleep 5
  done
fi
pkill -f scripts/experiments.sh || true
pkill -f "bin/misstep optimize .*--run-dir $run_dir" || true  # this run's loop, no other
# The run's lock (an flock, data/runfiles.py: RunLock) is free once the last process holding it is
# gone, forked workers included, which can outlive the loop by seconds.
flock -w 120 "$run_dir/.lock" true
echo "== $(date -u +%FT%TZ) $why" >> "$run_dir/pauses.txt"
.venv/bin/python scripts/carry_run.py save "$run_dir" "$carried"
du -sh "$carried"
