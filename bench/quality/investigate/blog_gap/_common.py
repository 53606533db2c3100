"""What the blog-gap scripts share: seed lists and the results CSV they append to."""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path

COLUMNS = ["side", "randomness", "seed", "auroc", "n_flipped", "src_pos_frac", "tgt_pos_frac", "wall_s", "cpu_s"]


def parse_seeds(text: str) -> list[int]:
    """"0-19", "0,3,7" or "0-4,10" -> the seeds."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


@contextlib.contextmanager
def results_writer(path: str):
    """write_row(row) appending to `path` (header written when the file is new, every row flushed
    at once), so that several batches of seeds land in one file and a killed batch keeps its rows."""
    new = not Path(path).exists()
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(COLUMNS)

        def write_row(row) -> None:
            w.writerow(row)
            fh.flush()

        yield write_row
