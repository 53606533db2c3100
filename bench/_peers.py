"""Where the benches find the peer libraries' virtualenvs (never our dependencies): one folder per
library (pydvl, opendataval, dattri, kronfluence, traker), made by bench/peers/setup_*.sh.
``$DVGS_PEER_VENVS`` names the folder; by default ``runs/peer-venvs`` in this checkout (ignored)."""
from __future__ import annotations

import os
from pathlib import Path

PEER_VENVS = Path(os.environ.get("DVGS_PEER_VENVS", Path(__file__).resolve().parent.parent / "runs" / "peer-venvs"))


def peer_python(name: str) -> str:
    """The python of one peer's virtualenv."""
    return str(PEER_VENVS / name / "bin" / "python")
