#!/usr/bin/env bash
# dattri 0.3.0 in its own virtualenv (never a dependency of dvgs_fast), for bench/peers/dattri_attribution.py.
# VENV defaults to $DVGS_PEER_VENVS/dattri (runs/peer-venvs/dattri); the creation is serialised with flock (other benches share it).
set -euo pipefail
VENV="${VENV:-${DVGS_PEER_VENVS:-runs/peer-venvs}/dattri}"
mkdir -p "$(dirname "$VENV")"
flock "$(dirname "$VENV")/.dattri.lock" bash -c "
  test -x '$VENV/bin/python' || python3 -m venv '$VENV'
  '$VENV/bin/pip' install -q 'torch==2.13.0' 'dattri==0.3.0'
"
"$VENV/bin/python" -c "import importlib.metadata as m, torch; print('dattri', m.version('dattri'), 'torch', torch.__version__)"
