#!/usr/bin/env bash
# The pyDVL 0.10.0 virtualenv every peer benchmark shares ($1/pydvl), created once (flock: the
# setup scripts may run side by side): with the "influence" extra, because pyDVL's influence
# package imports dask.distributed even for torch models; the semivalue benches need no more.
# Called by setup_peers.sh and setup_influence_peers.sh.
set -euo pipefail
ROOT=$1
cd "$ROOT"
flock "$ROOT/.pydvl.lock" bash -c '
set -e
test -x pydvl/bin/python || python3 -m venv pydvl
pydvl/bin/python -c "import pydvl.influence.torch" 2>/dev/null || \
  pydvl/bin/pip install -q "pydvl[influence]==0.10.0" "numpy<2" "torch==2.13.0"'
