#!/usr/bin/env bash
# Continue `giva bench --suite evidence` in the background, phase by phase (each phase is a fresh process,
# so it runs the code as it is when the phase starts); finished runs are skipped, so rerunning continues.
# Every COMMIT_EVERY seconds (0: never) the report is rewritten from the finished runs
# (`giva bench --report-only`) and the run JSONs, the report and its plots are committed, and
# nothing else: `git commit -- <paths>` leaves other staged changes alone. Usage, from anywhere:
#   nohup benchmarks/run_evidence.sh > /tmp/giva-evidence.log 2>&1 &
# SKIP_PHASES="speed-defaults speed-smollm2-defaults" leaves those phases for a quiet machine (timings).
# GIVA_CPU_LOCK=/path/to/lockfile: the periodic report takes that flock first, so it never runs beside a
# timing job that holds it (an unlocked report overlapping speed-defaults once tripled an init time).
set -u
cd "$(dirname "$0")/.."
COMMIT_EVERY=${COMMIT_EVERY:-1200}
OUT=benchmarks/results/evidence
GIVA=${GIVA:-.venv/bin/giva}

commit_results() {
    [ -d "$OUT/runs" ] || return 0
    # With GIVA_CPU_LOCK set (a flock file that timing jobs hold), the report waits for it like any heavy job.
    ${GIVA_CPU_LOCK:+flock "$GIVA_CPU_LOCK"} nice -n 19 "$GIVA" bench --suite evidence --report-only > /dev/null 2>&1 \
        || echo "report not rewritten"
    for attempt in 1 2 3 4 5; do
        if [ ! -e .git/index.lock ]; then
            paths=()
            for p in "$OUT/runs" "$OUT/results.md" "$OUT/results.json" "$OUT"/*.png; do [ -e "$p" ] && paths+=("$p"); done
            git add -- "${paths[@]}"
            n=$(ls "$OUT/runs" | wc -l)
            git commit -q -m "bench evidence: partial results ($n run files so far; resumable)" -- "${paths[@]}" \
                && echo "committed $n run files at $(date -u +%H:%M)"
            return 0
        fi
        sleep 5
    done
}

committer() {
    while sleep "$COMMIT_EVERY"; do commit_results; done
}

if [ "$COMMIT_EVERY" -gt 0 ]; then committer & COMMITTER=$!; fi
# PHASES="runner-up-r8 runner-up-task2" runs those phases only (default: every phase, in suite order).
phases=${PHASES:-$(.venv/bin/python -c "import json; print(' '.join(p['name'] for p in json.load(open('benchmarks/suites/evidence.json'))['phases']))")}
for phase in $phases; do
    case " ${SKIP_PHASES:-} " in *" $phase "*) echo "=== phase $phase skipped (SKIP_PHASES)"; continue;; esac
    echo "=== phase $phase ($(date -u +%H:%M))"
    nice -n 19 "$GIVA" bench --suite evidence --phases "$phase"
done
if [ "$COMMIT_EVERY" -gt 0 ]; then kill "$COMMITTER"; commit_results; fi
echo "=== done ($(date -u +%H:%M)); giva bench --suite evidence --dry-run lists what is left"
