"""The fixed cost of one delta conv on the cpu backend: a DeltaConv2d layer called on deltas of a few
updated pixels, so that the time is the Python, pybind and allocation around the kernels, with the
variants (cpu_profile.py's switches) interleaved call by call. 1 thread, process CPU clock.

    PYTHONPATH=. python3 benchmarks/cpu_conv_overhead.py --pixels 1 --calls 2000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_profile import _set_switch  # noqa: E402
from deltacnn.activations import ActSpec  # noqa: E402
from deltacnn.backends.reference import _scatter_rows  # noqa: E402
from deltacnn.geometry import Window  # noqa: E402
from deltacnn.layers import DeltaConv2d  # noqa: E402
from deltacnn.tensor import DeltaTensor  # noqa: E402

CASES = {  # name -> (cin, cout, k, stride, act, residual, h, w)
    "3x3 64->64 silu 72x96": (64, 64, 3, 1, "silu", False, 72, 96),
    "1x1 64->64 silu 72x96": (64, 64, 1, 1, "silu", False, 72, 96),
    "3x3 16->32 s2 silu 288x384": (16, 32, 3, 2, "silu", False, 288, 384),
    "1x1 144->24 linear+res 72x96": (144, 24, 1, 1, None, True, 72, 96),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pixels", type=int, default=1, help="updated input pixels of each delta")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--variants", default="calls:one_call=0;one:", help="switch settings as cpu_profile.py's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    variants = []
    for part in args.variants.split(";"):
        name, _, sets = part.partition(":")
        variants.append((name, {k: bool(float(v)) for k, v in (a.split("=") for a in filter(None, sets.split(",")))}))
    keys = {k for _, kv in variants for k in kv}
    for case, (cin, cout, k, s, act, with_res, h, w) in CASES.items():
        layer = DeltaConv2d(torch.randn(cout, cin, k, k, generator=gen) * 0.1, torch.zeros(cout),
                            Window.make(k, s, k // 2), act=ActSpec(act) if act else None, act_name="conv",
                            residual=with_res)
        ho, wo = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        res_key = DeltaTensor.keyframe(torch.randn(1, cout, ho, wo, generator=gen)) if with_res else None
        with torch.no_grad():
            layer(DeltaTensor.keyframe(torch.randn(1, cin, h, w, generator=gen)), res_key)
            idx = torch.randperm(h * w, generator=gen)[:args.pixels].sort().values
            d = _scatter_rows(1, cin, h, w, idx, torch.randn(idx.numel(), cin, generator=gen), idx)
            r = None
            if with_res:
                ridx = torch.randperm(ho * wo, generator=gen)[:args.pixels].sort().values
                r = _scatter_rows(1, cout, ho, wo, ridx, torch.randn(ridx.numel(), cout, generator=gen), ridx)
            times = {name: [] for name, _ in variants}
            for i in range(args.calls):
                for name, kv in variants:
                    for key in keys:
                        _set_switch(key, kv.get(key, True))
                    t0 = time.process_time()
                    layer(d, r)
                    times[name].append(time.process_time() - t0)
        for key in keys:
            _set_switch(key, True)
        base = variants[0][0]
        line = ", ".join(f"{n} {statistics.mean(t[100:]) * 1e6:.1f} us" for n, t in times.items())
        diffs = [statistics.mean(t[100:]) - statistics.mean(times[base][100:]) for t in times.values()]
        print(f"{case:32s} {args.pixels} px: {line}; vs {base}: " + ", ".join(f"{x * 1e6:+.1f}" for x in diffs[1:]))


if __name__ == "__main__":
    main()
