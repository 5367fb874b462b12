#!/usr/bin/env bash
# A CPU stand-in for the device machine's Python, to dry-run benchmarks/gpu/run_on_device.sh against the versions it
# will meet there (docs/gpu.md, "The CPU dry run"): Python 3.12, torch 2.11 (the CUDA 13 build from PyPI, which runs
# on a machine without a GPU: about 3.5 GB with its nvidia-* libraries), transformers 5.17.0 with huggingface-hub
# 1.33.0, accelerate, pytest, and an older PEFT (0.17.0, which the carried 0.22.0 must shadow), no matplotlib, no TRL.
#     bash benchmarks/gpu/device_env.sh [VENV]        # default /tmp/giva-device-env; then, from the repository root:
#     OUT=/tmp/gpu-dry PYTHON=/tmp/giva-device-env/bin/python bash benchmarks/gpu/run_on_device.sh --tiny
set -euo pipefail
VENV=${1:-/tmp/giva-device-env}
PY312=${PY312:-$(command -v python3.12 || true)}
if [ -z "$PY312" ] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "device_env.sh: needs a Python 3.12 interpreter (set PY312=/path/to/python3.12)" >&2
    exit 2
fi
"$PY312" -m venv "$VENV"
# and what the image has of TRL's and datasets' needs (KINDS.md's package list), without TRL, datasets, dill and
# multiprocess, which travel as wheels (benchmarks/gpu/wheels/sft)
# (versions as the device's pip list gives them, KINDS.md: accelerate 1.15.0, tokenizers 0.23.2, safetensors 0.8.0; and
# setuptools, which the image has and a fresh venv lacks, so that the script's `pip install .` path runs here too)
"$VENV/bin/python" -m pip install -q "torch==2.11.0" "transformers==5.17.0" "huggingface-hub==1.33.0" \
    "accelerate==1.15.0" "tokenizers==0.23.2" "safetensors==0.8.0" "setuptools>=77" pytest \
    "peft==0.17.0" numpy pandas pyarrow xxhash fsspec httpx requests tqdm pyyaml psutil jinja2
"$VENV/bin/python" -c 'import torch, transformers; print(f"device_env.sh: {torch.__version__}, transformers {transformers.__version__}")'
