# Sourced by demo.sh and test.sh: create or reuse a virtual environment with vidrec installed.
# VIDREC_VENV picks the environment (default: .venv in the repository).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VIDREC_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[vidrec] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# pip's output (notices, dependency warnings) only when it fails: a person reads one line per step.
quiet_pip() {
  local log
  log=$(mktemp)
  if ! pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "[vidrec] pip install $* failed (output above)" >&2
    return 1
  fi
  rm -f "$log"
}

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[vidrec] installing torch (CUDA build)"
    quiet_pip torch
  else
    # A plain 'torch' requirement pulls a multi-GB CUDA build; without a GPU take the CPU wheel.
    echo "[vidrec] installing torch==2.13.0 (no CUDA device found)"
    quiet_pip torch==2.13.0
  fi
fi

# Reinstall only when the package definition changed (an editable install sees code changes).
stamp="$VENV/.vidrec-install-stamp"
wanted=$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "[vidrec] installing vidrec and its dependencies into $VENV"
  quiet_pip -e "$ROOT[test]"
  echo "$wanted" > "$stamp"
fi
cd "$ROOT"
