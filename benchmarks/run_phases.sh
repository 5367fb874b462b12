#!/usr/bin/env bash
# Run only the named phases of `giva bench --suite evidence` in the background at nice 19, in one process per
# phase (resumable: finished runs are skipped), committing the new run JSONs every COMMIT_EVERY seconds.
# Unlike run_evidence.sh it does not walk the finished phases (each of which rewrites the whole report).
# Usage: nohup benchmarks/run_phases.sh gap gap-task2 > /tmp/giva-gap.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
COMMIT_EVERY=${COMMIT_EVERY:-1200}
RUNS=benchmarks/results/evidence/runs
GIVA=${GIVA:-.venv/bin/giva}
commit_runs() {
    git add -- "$RUNS" && git commit -q -m "bench evidence: partial results ($(ls "$RUNS" | wc -l) run files so far; resumable)" -- "$RUNS" \
        && echo "committed at $(date -u +%H:%M)"
}
( while sleep "$COMMIT_EVERY"; do commit_runs; done ) &
COMMITTER=$!
for round in 1; do  # each phase process runs its rows until they settle; list a phase after the one it takes its LR from
    for phase in "$@"; do
        echo "=== phase $phase, round $round ($(date -u +%H:%M))"
        nice -n 19 "$GIVA" bench --suite evidence --phases "$phase"
    done
done
kill "$COMMITTER"; commit_runs
echo "=== done ($(date -u +%H:%M))"
