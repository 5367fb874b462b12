#!/usr/bin/env bash
# Make FOLDER a virtualenv with pip (scripts/setup.sh runs it for .venv): create it, or repair one left without
# pip, which `python3 -m venv` leaves behind where the venv module cannot install pip (Debian/Ubuntu without
# python3-venv); a rerun would otherwise skip the creation and fail on FOLDER/bin/pip.
# PYTHON picks the interpreter that creates it (default python3).
set -euo pipefail
VENV=${1:?usage: scripts/venv.sh FOLDER}
PYTHON=${PYTHON:-python3}
HINT="install your Python's venv support (Debian/Ubuntu: sudo apt install python3-venv), then run this again"

has_pip() { [ -x "$VENV/bin/pip" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV"; then
    echo "setup: '$PYTHON -m venv $VENV' failed; $HINT" >&2
    exit 1
  fi
fi
if ! has_pip; then
  echo "setup: $VENV has no pip; installing it with ensurepip" >&2
  if ! "$VENV/bin/python" -m ensurepip --upgrade --default-pip >/dev/null 2>&1 || ! has_pip; then
    echo "setup: $VENV has no pip and '$VENV/bin/python -m ensurepip' cannot install it; $HINT" >&2
    exit 1
  fi
fi
