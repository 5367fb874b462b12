#!/usr/bin/env bash
# `giva bench --suite gpu` on the device machine (one H200, Python 3.12, torch with CUDA, transformers
# 5.17, an older PEFT, nothing downloadable), in one process, results under $OUT.
#
# 1. Here, once: fetch the PEFT wheel the install needs (gitignored; it travels because `carry` names it):
#        python3 -m pip download --no-deps peft==0.21.2 -d benchmarks/gpu/wheels
#    and, for the two 4-bit rows (the machine has no bitsandbytes; this wheel, 43 MB, holds its CUDA 13 library):
#        python3 -m pip download --no-deps bitsandbytes==0.50.2 --platform manylinux_2_24_x86_64 \
#            --python-version 3.12 --only-binary=:all: -d benchmarks/gpu/wheels
# 2. Through the device tool, from the repository root:
#        run(command="bash benchmarks/gpu/run_on_device.sh", carry=["benchmarks/gpu/wheels"], timeout_s=480)
#    $OUT then holds results.json, results.md, steps.png and run.log (4 files, well under the tool's limits).
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
# An optional bitsandbytes wheel: with it the 4-bit rows run, without it they are skipped with the reason.
extra=(benchmarks/gpu/wheels/bitsandbytes-*.whl)
if [ "${#extra[@]}" -gt 1 ]; then
    echo "run_on_device.sh: expected at most one bitsandbytes wheel in benchmarks/gpu/wheels, found ${#extra[@]}" | tee "$LOG" >&2
    exit 2
fi
# PEFT (and bitsandbytes) from the carried wheels and giva from this checkout, without dependencies (the
# machine has the rest), into a folder of their own that shadows the machine's older PEFT.
PIP=("$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE")
SOURCE=""
if ! "${PIP[@]}" "${wheels[0]}" "${extra[@]}" . 2>&1 | tee "$LOG"; then
    # the machine's setuptools could not build this checkout: import giva from src/ instead (the log says so)
    echo "run_on_device.sh: pip could not install giva from this checkout; importing it from src/" | tee -a "$LOG"
    "${PIP[@]}" "${wheels[0]}" "${extra[@]}" 2>&1 | tee -a "$LOG"
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
"$PYTHON" -m giva.bench.gpu --output-dir "$OUT" "$@" 2>&1 | tee -a "$LOG"
