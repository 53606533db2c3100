#!/usr/bin/env bash
# Peer libraries for the semivalue / LAVA benchmarks, each in its own virtualenv (never our
# dependencies): $DVGS_PEER_VENVS/pydvl (pyDVL 0.10.0) and $DVGS_PEER_VENVS/opendataval
# (OpenDataVal 1.3.0). Usage: bash bench/peers/setup_peers.sh [VENV_ROOT]
#
# Both use the same torch as we do (2.13.0+cpu from this machine's wheel folder), so that the
# CPU-time comparisons run the same BLAS/ATen kernels on both sides. OpenDataVal 1.3 pins
# torch~=2.1 and torchvision~=0.16; we install it with --no-deps and its other requirements as
# pinned. torchvision is only imported by OpenDataVal's image-dataset module (CIFAR/MNIST
# loaders, unused here) and PyPI's CUDA-built torchvision wheel does not load against a CPU
# torch ("operator torchvision::nms does not exist"), so a stub package stands in for it
# (names only; using it raises). The methods compared (LAVA with its otdd/geomloss code, Data
# Banzhaf, Beta Shapley) never touch torchvision.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${1:-${DVGS_PEER_VENVS:-runs/peer-venvs}}
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
cd "$ROOT"
bash "$HERE/venv_pydvl.sh" "$ROOT"
flock "$ROOT/.opendataval.lock" bash -c '
set -e
if [ ! -x opendataval/bin/python ]; then
  python3 -m venv opendataval
  P=opendataval/bin/pip
  $P install -q "torch==2.13.0"
  $P install -q --no-deps "opendataval==1.3.0"
  $P install -q "geomloss~=0.2.6" "numpy<1.26,>=1.22.4" "pandas<2,>=1.5.3" "pandera~=0.15.1" "requests~=2.31" \
      "scikit-learn~=1.3" "scipy~=1.11" "torcheval~=0.0.7" "tqdm~=4.64.1" "transformers<4.40" "typer~=0.9.0" \
      "matplotlib~=3.8" pillow
fi
SITE=$(opendataval/bin/python -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")
if ! opendataval/bin/python -c "import torchvision" 2>/dev/null || [ -f "$SITE/torchvision/STUB" ]; then
  opendataval/bin/pip uninstall -q -y torchvision 2>/dev/null || true
  mkdir -p "$SITE/torchvision/transforms" "$SITE/torchvision/models"
  touch "$SITE/torchvision/STUB"
  STUB="def __getattr__(name):
    class _Unavailable:
        def __init__(self, *a, **k):
            raise ImportError(\"torchvision is a stub in this benchmark venv (bench/peers/setup_peers.sh)\")
    _Unavailable.__name__ = name
    return _Unavailable
"
  for f in __init__.py datasets.py transforms/__init__.py transforms/functional.py models/__init__.py models/resnet.py; do
    printf "%s" "$STUB" > "$SITE/torchvision/$f"
  done
fi'
pydvl/bin/python -c "import pydvl, sklearn, torch; print('pydvl', pydvl.__version__, 'sklearn', sklearn.__version__, 'torch', torch.__version__)"
opendataval/bin/python -c "import opendataval, geomloss, torch; from opendataval.dataval import LavaEvaluator, DataBanzhaf, BetaShapley; print('opendataval', opendataval.__version__, 'geomloss', geomloss.__version__, 'torch', torch.__version__)"
