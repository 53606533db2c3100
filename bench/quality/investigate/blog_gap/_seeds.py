"""Seed lists for the blog-gap scripts: "0-19", "0,3,7" or "0-4,10"."""
from __future__ import annotations


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out
