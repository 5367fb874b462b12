# Sourced by the shell diagnostics beside it, with their arguments: the repository root as the working folder, WORK
# (the first argument, else a new temporary folder named after NAME), and the venv's PYTHON, GIVA and TORCHRUN.
#     NAME=sft-resume; source "$(dirname "$0")/common.sh" "$@"
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/giva-$NAME.XXXXXX")}
PYTHON=${PYTHON:-.venv/bin/python}
GIVA=$(dirname "$PYTHON")/giva
TORCHRUN=$(dirname "$PYTHON")/torchrun
