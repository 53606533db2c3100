#!/usr/bin/env bash
# traker 0.3.2 (MadryLab's TRAK) in its own virtualenv, never a dependency of dvgs_fast.
# Used by bench/bench_trak.py through bench/peers/traker_runner.py.
set -euo pipefail
VENV=${TRAKER_VENV:-${DVGS_PEER_VENVS:-runs/peer-venvs}/traker}
mkdir -p "$(dirname "$VENV")"
(
  flock 9
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "traker==0.3.2"
  fi
) 9>"$(dirname "$VENV")/.traker.lock"
"$VENV/bin/python" -c "import trak, torch; print('traker', trak.__version__, 'torch', torch.__version__)"
