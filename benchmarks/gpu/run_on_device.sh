#!/usr/bin/env bash
# `giva bench --suite gpu` on the device machine (one H200, Python 3.12, torch with CUDA, transformers
# 5.17, an older PEFT, nothing downloadable), in one process, results under $OUT.
#
# 1. Here, once: fetch the PEFT wheel the install needs (gitignored; it travels because `carry` names it):
#        python3 -m pip download --no-deps peft==0.21.2 -d benchmarks/gpu/wheels
#    and, for the two 4-bit rows (the machine has no bitsandbytes; this wheel, 43 MB, holds its CUDA 13 library):
#        python3 -m pip download --no-deps bitsandbytes==0.50.2 --platform manylinux_2_24_x86_64 \
#            --python-version 3.12 --only-binary=:all: -d benchmarks/gpu/wheels
# 2. Through the device tool, from the repository root (a session has 15 minutes of device time, the machine's
#    start included; the suite takes at most about 5 minutes, so the serve stage gets a call of its own):
#        run(command="STAGES='gpu tests' bash benchmarks/gpu/run_on_device.sh", carry=["benchmarks/gpu/wheels"], timeout_s=480)
#        run(command="STAGES=serve bash benchmarks/gpu/run_on_device.sh", carry=["benchmarks/gpu/wheels"], timeout_s=240)
#    $OUT then holds results.json, results.md, steps.png and run.log (4 files, well under the tool's limits),
#    then tests.log (the CUDA tests, when pytest imports: carry its wheels too, `pip download --no-deps pytest
#    pluggy iniconfig pygments`) and serve/ (the accelerator serve benchmark, N = 1, 8, 32 adapters).
#    STAGES picks and orders the stages (default "gpu tests serve"); each later stage has its own time limit
#    (TESTS_TIMEOUT_S, default 90; SERVE_TIMEOUT_S, default 150) and a failing stage does not stop the next.
# Dry run on CPU with the tiny shapes (what this machine allows):
#        OUT=/tmp/gpu-dry PYTHON=.venv/bin/python bash benchmarks/gpu/run_on_device.sh --tiny
# Further arguments go to `python -m giva.bench.gpu` (--tiny, --shapes 1B, --rows floor,giva, --budget-s 200).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
SITE=$(mktemp -d "${TMPDIR:-/tmp}/giva-site.XXXXXX")
mkdir -p "$OUT"
LOG="$OUT/run.log"

shopt -s nullglob
wheels=(benchmarks/gpu/wheels/peft-*.whl)
if [ "${#wheels[@]}" -ne 1 ]; then
    echo "run_on_device.sh: expected one PEFT wheel in benchmarks/gpu/wheels, found ${#wheels[@]}; fetch it first:" \
         "python3 -m pip download --no-deps peft==0.21.2 -d benchmarks/gpu/wheels" | tee "$LOG" >&2
    exit 2
fi
# Optional wheels: bitsandbytes (with it the 4-bit rows and tests run, without it they are skipped with the
# reason) and pytest's (pytest, pluggy, iniconfig, pygments: the tests stage).
extra=(benchmarks/gpu/wheels/bitsandbytes-*.whl)
if [ "${#extra[@]}" -gt 1 ]; then
    echo "run_on_device.sh: expected at most one bitsandbytes wheel in benchmarks/gpu/wheels, found ${#extra[@]}" | tee "$LOG" >&2
    exit 2
fi
others=(benchmarks/gpu/wheels/pytest-*.whl benchmarks/gpu/wheels/pluggy-*.whl benchmarks/gpu/wheels/iniconfig-*.whl benchmarks/gpu/wheels/pygments-*.whl)
# PEFT (and bitsandbytes) from the carried wheels and giva from this checkout, without dependencies (the
# machine has the rest), into a folder of their own that shadows the machine's older PEFT.
PIP=("$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE")
SOURCE=""
if ! "${PIP[@]}" "${wheels[0]}" "${extra[@]}" "${others[@]}" . 2>&1 | tee "$LOG"; then
    # the machine's setuptools could not build this checkout: import giva from src/ instead (the log says so)
    echo "run_on_device.sh: pip could not install giva from this checkout; importing it from src/" | tee -a "$LOG"
    "${PIP[@]}" "${wheels[0]}" "${extra[@]}" "${others[@]}" 2>&1 | tee -a "$LOG"
    SOURCE=":$PWD/src"
fi
export PYTHONPATH="$SITE$SOURCE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" - "${wheels[0]}" "${extra[@]}" <<'PY' 2>&1 | tee -a "$LOG"
import sys
import giva, peft, torch, transformers
wanted = sys.argv[1].split("/")[-1].split("-")[1]
print(f"giva {giva.__file__}; peft {peft.__version__} ({peft.__file__}); torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}); "
      f"transformers {transformers.__version__}")
if peft.__version__ != wanted:
    sys.exit(f"run_on_device.sh: imported PEFT {peft.__version__}, not the carried {wanted}")
for wheel in sys.argv[2:]:  # a carried bitsandbytes must be the one imported (the suite imports it lazily)
    import bitsandbytes
    carried = wheel.split("/")[-1].split("-")[1]
    print(f"bitsandbytes {bitsandbytes.__version__} ({bitsandbytes.__file__})")
    if bitsandbytes.__version__ != carried:
        sys.exit(f"run_on_device.sh: imported bitsandbytes {bitsandbytes.__version__}, not the carried {carried}")
PY
# The test files holding the tests marked `cuda` (tests/test_bench_gpu.py checks that no other file has one).
CUDA_TESTS="tests/test_folded_forward.py tests/test_quant.py tests/test_serving.py"
TINY=""
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY="--tiny"; done
for stage in ${STAGES:-gpu tests serve}; do
    echo "run_on_device.sh: stage $stage" | tee -a "$LOG"
    case "$stage" in
    gpu)
        "$PYTHON" -m giva.bench.gpu --output-dir "$OUT" "$@" 2>&1 | tee -a "$LOG" || echo "run_on_device.sh: stage gpu exited $?" | tee -a "$LOG" ;;
    tests)  # the CUDA tests (skipped, and so reported, without a GPU); pytest only if it imports
        if "$PYTHON" -c "import pytest" 2>/dev/null; then
            timeout "${TESTS_TIMEOUT_S:-90}" "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m cuda $CUDA_TESTS > "$OUT/tests.log" 2>&1 \
                || echo "run_on_device.sh: stage tests exited $?" | tee -a "$LOG"
            tail -3 "$OUT/tests.log" | tee -a "$LOG"
        else
            echo "run_on_device.sh: pytest does not import; carry its wheels to run the tests stage" | tee -a "$LOG"
        fi ;;
    serve)  # the accelerator serve benchmark (tiny shapes on the CPU for a dry run)
        timeout "${SERVE_TIMEOUT_S:-150}" "$PYTHON" - "$OUT/serve" $TINY <<'PY' 2>&1 | tee -a "$LOG" || echo "run_on_device.sh: stage serve exited $?" | tee -a "$LOG"
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
        ;;
    *)
        echo "run_on_device.sh: unknown stage $stage (stages: gpu tests serve)" | tee -a "$LOG" >&2
        exit 2 ;;
    esac
done
