"""The influence R-operator's two convolution products that share the loss's gradient g across
directions -- Σ_i wgrad(Ra_ik, g_i) and igrad(g_i, dW_k) for K directions at once -- as one
convolution over the K directions' channels stacked (what hvp_conv.conv_r_backward does) against
a grouped convolution (groups = K) on g repeated K times (what it did before).

    python bench/bench_hvp_conv_directions.py --out runs/bench/hvp_conv_directions [--rounds 7]

The layer: the digits CNN's second convolution (bench_influence.py: Conv2d 8 -> 16, 3x3, padding 1,
on 16 x 16 maps), channels-last as the route keeps it; (rows, directions) = (100, 10) -- LiSSA's
batch -- and (1000, 4). 1 torch thread; CPU time (time.process_time), 5 calls per round, rounds
interleaved, medians. Both forms are checked equal first. Writes OUT/hvp_conv_directions.json and .md.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dvgs_fast.methods.influence import hvp_conv as hc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import bench_setup, report_markdown  # noqa: E402

SHAPES = ((100, 10), (1000, 4))


def _backward(m, x, go, w, which: str, groups: int):
    """aten's convolution backward for the weight ("wgrad": x the input, w the weight's shape) or the
    input ("igrad": x the input's shape, w the weight), with `groups` (K: the former form; 1: the route's)."""
    if which == "wgrad":
        return torch.ops.aten.convolution_backward(hc.layout(m, go), hc.layout(m, x), go.new_empty(1).expand(w), None,
                                                   m.stride, m.padding, m.dilation, False, [0, 0], groups,
                                                   (False, True, False))[1]
    return torch.ops.aten.convolution_backward(hc.layout(m, go), go.new_empty(1).expand(x), hc.layout(m, w), None,
                                               m.stride, m.padding, m.dilation, False, [0, 0], groups,
                                               (True, False, False))[0]


def cases(n: int, K: int):
    torch.manual_seed(0)
    m = nn.Conv2d(8, 16, 3, padding=1)
    c, o, H = 8, 16, 16
    Ra = hc.layout(m, torch.randn(n * K, c, H, H)).view(n, K, c, H, H)
    g = hc.layout(m, torch.randn(n, o, H, H))
    dW = torch.randn(K, o, c, 3, 3)
    gK = lambda: g.unsqueeze(1).expand(n, K, o, H, H).reshape(n, K * o, H, H)   # noqa: E731
    return {
        "Σ wgrad(Ra_k, g)": (
            lambda: _backward(m, Ra.reshape(n, K * c, H, H), gK(), (K * o, c, 3, 3), "wgrad", K).view(K, o, c, 3, 3),
            lambda: _backward(m, Ra.reshape(n, K * c, H, H), g, (o, K * c, 3, 3), "wgrad", 1).reshape(
                o, K, c, 3, 3).transpose(0, 1)),
        "igrad(g, dW_k)": (
            lambda: _backward(m, (n, K * c, H, H), gK(), dW.reshape(K * o, c, 3, 3), "igrad", K).view(n, K, c, H, H),
            lambda: _backward(m, (n, K * c, H, H), g, dW.transpose(0, 1).reshape(o, K * c, 3, 3), "igrad", 1).view(
                n, K, c, H, H)),
    }


def main() -> None:
    a, out = bench_setup(__doc__, "runs/bench/hvp_conv_directions", 7)
    load = [os.getloadavg()[0]]
    rows = []
    for n, K in SHAPES:
        for name, (grouped, stacked) in cases(n, K).items():
            torch.testing.assert_close(grouped(), stacked(), rtol=1e-4, atol=1e-3)
            t = {"grouped": [], "stacked": []}
            for _ in range(a.rounds):
                for label, fn in (("grouped", grouped), ("stacked", stacked)):
                    c0 = time.process_time()
                    for _ in range(5):
                        fn()
                    t[label].append((time.process_time() - c0) / 5 * 1e3)
            g, s = float(np.median(t["grouped"])), float(np.median(t["stacked"]))
            rows.append({"rows": n, "directions": K, "product": name, "grouped_ms": g, "stacked_ms": s,
                         "speedup": g / s})
            print(rows[-1], flush=True)
    load.append(os.getloadavg()[0])
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "rounds": a.rounds, "load": load,
           "rows": rows}
    (out / "hvp_conv_directions.json").write_text(json.dumps(doc, indent=1))
    md = report_markdown(
        "Influence R-operator: a convolution's shared-g products over K directions", doc,
        "bench_hvp_conv_directions.py", "Conv2d 8 -> 16, 3x3, 16 x 16 maps, channels-last.",
        ["rows", "directions", "product", "grouped on g repeated K times, ms", "channels stacked, ms", "speed-up"],
        "rrlrrr", [[str(r["rows"]), str(r["directions"]), r["product"], f"{r['grouped_ms']:.1f}",
                    f"{r['stacked_ms']:.1f}", f"{r['speedup']:.1f}x"] for r in rows])
    (out / "hvp_conv_directions.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
