#!/usr/bin/env bash
# Peer libraries for bench/bench_influence.py, each in its own virtualenv (never a dependency of
# dvgs_fast): pyDVL 0.10.0, dattri 0.3.0 and Kronfluence 1.0.1, all on the same torch as ours
# (2.13.0, CPU) so that CPU-time comparisons run the same ATen/BLAS kernels on both sides.
# Usage: bash bench/peers/setup_influence_peers.sh [VENV_ROOT]   (default $DVGS_PEER_VENVS or runs/peer-venvs)
# Creation of each venv is serialised with flock (other benchmarks share them).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${1:-${DVGS_PEER_VENVS:-runs/peer-venvs}}
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
cd "$ROOT"
bash "$HERE/venv_pydvl.sh" "$ROOT"
flock "$ROOT/.dattri.lock" bash -c '
set -e
if [ ! -x dattri/bin/python ]; then
  python3 -m venv dattri
  dattri/bin/pip install -q "torch==2.13.0" "dattri==0.3.0"
fi'
flock "$ROOT/.kronfluence.lock" bash -c '
set -e
if [ ! -x kronfluence/bin/python ]; then
  python3 -m venv kronfluence
  kronfluence/bin/pip install -q "torch==2.13.0" "kronfluence==1.0.1"
fi'
for v in pydvl dattri kronfluence; do
  "$ROOT/$v/bin/python" -c "import importlib.metadata as m, torch; print('$v', m.version({'pydvl': 'pyDVL'}.get('$v', '$v')), 'torch', torch.__version__)"
done
