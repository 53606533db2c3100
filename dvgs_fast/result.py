"""ValuationResult: the one result type every valuation method returns."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_bytes


@dataclass
class ValuationResult:
    """Data values for the source samples (higher = more valuable).

    values      numpy float64 array [N_source]
    method      name of the method that produced them ("dvgs", "lossval", ...)
    params      the settings of the run (JSON-serialisable)
    timings     seconds spent per phase
    n_snapshots how many gradient-similarity snapshots (DVGS) or iterations (others) were averaged
    snapshots   optional [N_source, n_snapshots] array (memory-mapped for DVGS when kept)
    info        anything else a method reports (e.g. how far a budgeted run got)
    """

    values: np.ndarray
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    n_snapshots: int = 0
    snapshots: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64).reshape(-1)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        return (f"ValuationResult(method={self.method!r}, n={len(self)}, "
                f"n_snapshots={self.n_snapshots}, timings={ {k: round(v, 3) for k, v in self.timings.items()} })")

    def to_frame(self):
        """A pandas DataFrame with one row per source sample (pandas is optional)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("ValuationResult.to_frame() needs pandas: pip install pandas") from exc
        return pd.DataFrame({"index": np.arange(len(self)), "value": self.values})

    def save(self, path: str | os.PathLike) -> Path:
        """Write values and metadata to one .npz file, atomically (temp file + rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        meta = {"method": self.method, "params": self.params, "timings": self.timings,
                "n_snapshots": self.n_snapshots, "info": self.info}
        import io
        buf = io.BytesIO()
        arrays = {"values": self.values, "meta": np.frombuffer(
            json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)}
        if self.snapshots is not None:
            arrays["snapshots"] = np.asarray(self.snapshots)
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ValuationResult":
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            snaps = z["snapshots"] if "snapshots" in z.files else None
            return cls(values=z["values"], snapshots=snaps, **meta)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return repr(obj)
