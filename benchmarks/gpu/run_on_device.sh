#!/usr/bin/env bash
# The GPU checks on the device machine in ONE call (one H100 or H200; Python 3.12, torch with CUDA, transformers
# 5.17, pytest, an older PEFT, nothing downloadable): the gpu suite, the CUDA tests and the accelerator serve
# benchmark, each under its own time limit, results under $OUT as they are measured.
#
# 1. Here, once: the wheels the machine lacks (gitignored; they travel because `carry` names the folder), the
#    versions pinned below (PEFT the one the tests here run with; what the machine's Python 3.12 takes):
#        bash benchmarks/gpu/run_on_device.sh --fetch
#    (bitsandbytes, 43 MB with its CUDA 13 library, is optional: without it the two 4-bit rows and the NF4 tests
#    are skipped with that reason; so are TRL and the datasets it needs, 1.7 MB, which the machine lacks: without
#    them `giva sft`'s CUDA tests are skipped). Then, before EVERY call, stamp the commit (the tree travels without .git):
#        bash benchmarks/gpu/run_on_device.sh --stamp
# 2. Through the device tool, from the repository root:
#        run(command="bash benchmarks/gpu/run_on_device.sh", carry=["benchmarks/gpu/wheels"], timeout_s=520)
#    The script ends within DEADLINE_S (default 480 s, the machine's start not included), which leaves a
#    session's 15 minutes of device time room for a short second call on the still-warm machine.
#
# Stages (STAGES, default "gpu tests serve"), each under `timeout -s INT` (a Python stage saves what it measured
# and prints its table on SIGINT; KILL 15 s later) and a failing stage does not stop the next:
#    gpu    python -m giva.bench.gpu: results.json, results.md and steps.png, rewritten after every row;
#           limit GPU_TIMEOUT_S (default: what DEADLINE_S leaves after reserving the later stages' limits), the
#           suite's row budget 25 s less
#    tests  pytest -m cuda over $CUDA_TESTS (the image's pytest), into tests.log; limit TESTS_TIMEOUT_S (90)
#    serve  the accelerator serve benchmark, N = 1, 8, 32 adapters, into serve/; limit SERVE_TIMEOUT_S (90)
# $OUT then holds results.json, results.md, steps.png, run.log, tests.log, serve/results.json and
# serve/results.md (7 files; the tool returns 8 at most). Further arguments go to `python -m giva.bench.gpu`
# (--shapes 1B, --rows giva-compiled,vera, --budget-s 150); a rerun of one stage: STAGES=serve.
# Dry run on CPU with the tiny shapes (what this machine allows):
#        OUT=/tmp/gpu-dry PYTHON=.venv/bin/python bash benchmarks/gpu/run_on_device.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=benchmarks/gpu/wheels
PEFT_PIN=peft==0.22.0
BNB_PIN=bitsandbytes==0.50.2
SFT_PINS=(trl==1.16.0 datasets==4.8.0 dill==0.4.0 multiprocess==0.70.18)  # datasets 4.8: older pyarrow and hub
if [ "${1:-}" = "--fetch" ]; then  # pip skips a wheel already in the folder; one of an older pin is removed
    PY=${PYTHON:-python3}
    PIP_DOWNLOAD=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12)
    stale() {  # FOLDER PIN...: remove the folder's wheels of these packages at another version than pinned
        local folder=$1 pin; shift
        for pin in "$@"; do
            for wheel in "$folder/${pin%%==*}"-*.whl; do
                [ -e "$wheel" ] && [[ "$(basename "$wheel")" != "${pin%%==*}-${pin##*==}-"* ]] && rm -v "$wheel"
            done
        done
        return 0
    }
    mkdir -p "$WHEELS/sft"
    stale "$WHEELS" "$PEFT_PIN" "$BNB_PIN"
    stale "$WHEELS/sft" "${SFT_PINS[@]}"
    "${PIP_DOWNLOAD[@]}" "$PEFT_PIN" -d "$WHEELS"
    # the optional ones: a failed download is said, and the rest still comes
    "${PIP_DOWNLOAD[@]}" --platform manylinux_2_24_x86_64 "$BNB_PIN" -d "$WHEELS" \
        || echo "run_on_device.sh: $BNB_PIN not fetched: the 4-bit rows and tests will be skipped" >&2
    "${PIP_DOWNLOAD[@]}" "${SFT_PINS[@]}" -d "$WHEELS/sft" \
        || echo "run_on_device.sh: ${SFT_PINS[*]} not fetched: giva sft's CUDA tests will be skipped" >&2
    for pin in "$PEFT_PIN" "$BNB_PIN" "${SFT_PINS[0]}"; do  # the device should test what the tests here ran with
        here=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "${pin%%==*}" 2>/dev/null) || continue
        [ "$here" = "${pin##*==}" ] || echo "run_on_device.sh: $PY has ${pin%%==*} $here, the pin is $pin: update the pin?" >&2
    done
    find "$WHEELS" -name '*.whl' | LC_ALL=C sort | sed 's/^/run_on_device.sh: /'
    exit 0
fi
# The digest of src/ that --stamp records beside the commit, checked again where the tree arrives.
source_digest() { find src -type f -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16; }
if [ "${1:-}" = "--stamp" ]; then
    mkdir -p "$WHEELS"
    commit=$(git rev-parse HEAD)
    git diff --quiet HEAD -- src || commit="$commit-dirty"
    echo "$commit $(source_digest)" > "$WHEELS/COMMIT"
    echo "run_on_device.sh: $WHEELS/COMMIT: $(cat "$WHEELS/COMMIT")"
    exit 0
fi
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
DEADLINE_S=${DEADLINE_S:-480}
SITE=$(mktemp -d "${TMPDIR:-/tmp}/giva-site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
log() { echo "run_on_device.sh: $*" | tee -a "$LOG"; }

# The commit the records name (giva.bench.versions reads GIVA_COMMIT where the tree is no git checkout).
if [ -z "${GIVA_COMMIT:-}" ]; then
    if GIVA_COMMIT=$(git rev-parse HEAD 2>/dev/null); then
        git diff --quiet HEAD -- src 2>/dev/null || GIVA_COMMIT="$GIVA_COMMIT-dirty"
    elif [ -s "$WHEELS/COMMIT" ]; then
        read -r stamped digest < "$WHEELS/COMMIT"
        if [ "$digest" = "$(source_digest)" ]; then GIVA_COMMIT=$stamped; else GIVA_COMMIT="$stamped-stale"; fi
    else
        GIVA_COMMIT=unknown
    fi
fi
export GIVA_COMMIT
log "giva commit $GIVA_COMMIT ('-stale': src/ changed after --stamp; 'unknown': no stamp)"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/run_on_device.sh: device /' | tee -a "$LOG"
fi

shopt -s nullglob
wheels=("$WHEELS"/peft-*.whl)
if [ "${#wheels[@]}" -ne 1 ]; then
    log "expected one PEFT wheel in $WHEELS, found ${#wheels[@]}: run bash benchmarks/gpu/run_on_device.sh --fetch" \
        "here ($PEFT_PIN; it removes wheels of another version)" >&2
    exit 2
fi
# Optional: bitsandbytes (with it the 4-bit rows and the NF4 test run, without it they are skipped with the reason).
extra=("$WHEELS"/bitsandbytes-*.whl)
if [ "${#extra[@]}" -gt 1 ]; then
    log "expected at most one bitsandbytes wheel in $WHEELS, found ${#extra[@]}: run --fetch here ($BNB_PIN)" >&2
    exit 2
fi
# PEFT (and bitsandbytes) from the carried wheels and giva from this checkout, without dependencies (the
# machine has the rest, pytest included), into a folder of their own that shadows the machine's older PEFT.
PIP=("$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE")
SOURCE=""
if ! "${PIP[@]}" "${wheels[0]}" "${extra[@]}" . 2>&1 | tee -a "$LOG"; then
    # the machine's setuptools could not build this checkout: import giva from src/ instead (the log says so)
    log "pip could not install giva from this checkout; importing it from src/"
    "${PIP[@]}" "${wheels[0]}" "${extra[@]}" 2>&1 | tee -a "$LOG"
    SOURCE=":$PWD/src"
fi
# Optional: TRL and what it needs that the machine lacks (wheels/sft/), for giva sft's CUDA tests. A failed install
# (a dry run on another Python than the wheels' 3.12) is logged and checked no further: those tests then skip.
sft=("$WHEELS"/sft/*.whl)
if [ "${#sft[@]}" -gt 0 ] && ! "${PIP[@]}" "${sft[@]}" 2>&1 | tee -a "$LOG"; then
    log "the wheels in $WHEELS/sft did not install here; giva sft's CUDA tests use whatever TRL imports, or skip"
    sft=()
fi
# nothing is downloadable there: a stray hub lookup fails at once instead of waiting on DNS timeouts
export PYTHONPATH="$SITE$SOURCE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PYTHON" - "${wheels[0]}" "${extra[@]}" "${sft[@]}" <<'PY' 2>&1 | tee -a "$LOG"
import importlib, importlib.metadata, os, sys
import giva, torch, transformers
try:
    import pytest  # the image's (the tests stage)
    tests = f"pytest {pytest.__version__}"
except ImportError:
    tests = "no pytest: the tests stage will fail"
gpu = "none"
if torch.cuda.is_available():
    gpu = f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
print(f"giva {giva.__file__}; torch {torch.__version__} (CUDA {torch.version.cuda}, GPU {gpu}); "
      f"transformers {transformers.__version__}; {tests}")
site = os.environ["PYTHONPATH"].split(":")[0]
for wheel in sys.argv[1:]:  # each carried package must be the one imported (the suite imports bitsandbytes lazily)
    name, carried = wheel.split("/")[-1].split("-")[:2]
    try:
        module = importlib.import_module(name)
        found, where = importlib.metadata.version(name), module.__file__
    except Exception as error:  # noqa: BLE001 - reported below
        found, where = None, f"{type(error).__name__}: {error}"
    print(f"{name} {found} ({where})")
    if found is None and name == "bitsandbytes":  # its CUDA library did not load: the suite skips the 4-bit rows
        print(f"run_on_device.sh: the carried bitsandbytes {carried} does not import ({where}); the 4-bit rows and "
              "the NF4 tests will say so, the other stages go on")
        continue
    if found != carried or not where.startswith(site):
        problem = f"run_on_device.sh: imported {name} {found} from {where}, not the carried {carried}"
        if name in ("peft", "bitsandbytes"):
            sys.exit(problem)
        print(f"{problem}; giva sft's CUDA tests may fail or skip (the other stages go on)")  # the optional sft wheels
PY

# The test files holding the tests marked `cuda` (tests/test_bench_gpu.py checks that no other file has one).
CUDA_TESTS="tests/test_folded_forward.py tests/test_quant.py tests/test_serving.py tests/test_sft.py"
TINY=""
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY="--tiny"; done
STAGES=${STAGES:-gpu tests serve}
own_limit() {  # a stage's own time limit (empty for gpu: the rest)
    case "$1" in gpu) echo "${GPU_TIMEOUT_S:-}" ;; tests) echo "${TESTS_TIMEOUT_S:-90}" ;; serve) echo "${SERVE_TIMEOUT_S:-90}" ;; esac
}
summary=()
failed=0
remaining=" $STAGES "
for stage in $STAGES; do
    remaining=${remaining/ $stage / }
    reserve=0  # the later stages' limits (a gpu stage without one: 120 s)
    for later in $remaining; do
        l=$(own_limit "$later"); reserve=$((reserve + ${l:-120}))
    done
    left=$((DEADLINE_S - SECONDS - reserve))
    limit=$(own_limit "$stage"); limit=${limit:-$left}
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 20 ]; then
        log "stage $stage skipped: $limit s left of DEADLINE_S=$DEADLINE_S ($SECONDS s spent, $reserve s reserved)"
        summary+=("$stage skipped"); continue
    fi
    log "stage $stage, limit $limit s ($SECONDS s spent of $DEADLINE_S)"
    began=$SECONDS
    set +e
    case "$stage" in
    gpu)  # the suite's own budget ends its last row before the limit; "$@" after it may override it
        timeout -s INT -k 15 "$limit" "$PYTHON" -m giva.bench.gpu --output-dir "$OUT" --budget-s $((limit - 25)) "$@" 2>&1 \
            | tee -a "$LOG"
        rc=${PIPESTATUS[0]} ;;
    tests)  # the CUDA tests (skipped, and so reported, without a GPU)
        timeout -s INT -k 10 "$limit" "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m cuda $CUDA_TESTS > "$OUT/tests.log" 2>&1
        rc=$?
        tail -5 "$OUT/tests.log" | tee -a "$LOG" ;;
    serve)  # the accelerator serve benchmark (tiny shapes on the CPU for a dry run)
        timeout -s INT -k 15 "$limit" "$PYTHON" - "$OUT/serve" $TINY <<'PY' 2>&1 | tee -a "$LOG"
import logging, pathlib, sys
from giva.bench.serve import GpuServeSettings, run_serve_gpu
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # a line per point, in run.log as it runs
if "--tiny" in sys.argv:
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100, "max_position_embeddings": 64}
    settings = GpuServeSettings(ns=(1, 3), rows=4, tokens=(1, 5), r=4, rounds=2, device="cpu", shape=tuple(shape.items()))
else:
    settings = GpuServeSettings(ns=(1, 8, 32))
try:
    run_serve_gpu(sys.argv[1], settings)  # results.json and results.md rewritten after every point
finally:  # the table so far, also when the time limit's SIGINT stopped it
    table = pathlib.Path(sys.argv[1], "results.md")
    print(table.read_text() if table.exists() else "serve: no point measured")
PY
        rc=${PIPESTATUS[0]} ;;
    *)
        log "unknown stage $stage (stages: gpu tests serve)" >&2
        exit 2 ;;
    esac
    set -e
    took=$((SECONDS - began))
    case "$rc" in 0) what="ok" ;; 124|137) what="stopped at its limit (exit $rc)" ;; *) what="exit $rc" ;; esac
    [ "$rc" -eq 0 ] || failed=1
    log "stage $stage: $what, $took s"
    summary+=("$stage $what, $took s")
done
log "$(IFS=';'; echo "${summary[*]}"); $SECONDS s in all (DEADLINE_S=$DEADLINE_S); giva commit $GIVA_COMMIT"
exit "$failed"
