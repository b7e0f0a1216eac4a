# Sourced by the other scripts: makes sure a virtual environment with the project and its test
# dependencies exists (created on first use, reused afterwards, refreshed when pyproject.toml changes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDPRUNE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.fedprune-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[fedprune] setting up $VENV (first run takes a few minutes) ..." >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  # torch first, pinned to the builds this machine's wheel store has (torchaudio 2.11 pairs with torch 2.14.1)
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchaudio==2.11.0" 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -c "import lightning_fedprune, torch, torchaudio, lightning" 
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0
cd "$ROOT"
