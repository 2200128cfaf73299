"""GPU probe of the Triton delta kernels against cuDNN fp16, per layer, in ONE process.

1. correctness on the GPU (every variant timed below is first checked against a float32 cuDNN
   conv of the zero-filled delta, at the pixels of the output mask);
2. timing with triton.testing.do_bench (median ms) of: cuDNN fp16 channels_last eager and CUDA
   graph; the sparse conv (mask dilation + conv) eager and CUDA graph, in several launch configs;
   fused conv+ReLU vs conv then sparse_nonlinear; pointwise kernels.
Densities are compact blobs (a square of active input pixels, then the receptive-field dilation).
Prints a short table last; writes JSON to $OUT/kernels_probe.json when OUT is set.

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels_probe.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from deltacnn.backends import triton_kernels as tk  # noqa: E402

LAYERS = [  # name, cin, cout, k, H, W
    ("1x1 64->256 @270x480", 64, 256, 1, 270, 480),
    ("3x3 64->64 @270x480", 64, 64, 3, 270, 480),
    ("3x3 256->256 @68x120", 256, 256, 3, 68, 120),
    ("1x1 1024->256 @68x120", 1024, 256, 1, 68, 120),
]
DENSITIES = [0.0, 0.01, 0.05, 0.25, 1.0]
C = tk.ConvConfig
VARIANTS = {  # name: (config or None for the shape heuristic, out dtype)
    "def": (None, torch.float16),
    "bn64": (C(bn=64), torch.float16),
    "bn128": (C(bn=128), torch.float16),
    "t4x8": (C(th=4, tw=8, bn=64), torch.float16),
    "sk2": (C(bn=64, split_k=2), torch.float16),
    "sk4": (C(bn=64, split_k=4), torch.float16),
    "sk4bn128": (C(bn=128, split_k=4), torch.float16),
    "sk8": (C(bn=64, split_k=8), torch.float16),
    "def_f32": (None, torch.float32),
    "sk4_f32": (C(bn=64, split_k=4), torch.float32),
}


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def blob_mask(h, w, p, seed=0):
    """(1, 1, h, w) bool: a square covering about p of the pixels (all ones for p >= 1)."""
    if p >= 1:
        return torch.ones(1, 1, h, w, dtype=torch.bool, device="cuda")
    if p <= 0:
        return torch.zeros(1, 1, h, w, dtype=torch.bool, device="cuda")
    s = max(1, int(round(math.sqrt(p * h * w))))
    g = torch.Generator().manual_seed(seed)
    y0 = int(torch.randint(0, max(1, h - s), (1,), generator=g))
    x0 = int(torch.randint(0, max(1, w - s), (1,), generator=g))
    m = torch.zeros(1, 1, h, w, dtype=torch.bool, device="cuda")
    m[..., y0:y0 + s, x0:x0 + s] = True
    return m


def bench(fn, rep=10):
    """Median ms (do_bench flushes L2 between calls, so the inputs come from HBM as in a network)."""
    return do_bench(fn, warmup=3, rep=rep, return_mode="median")


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def probe_conv(name, cin, cout, k, h, w, results, quick):
    pad = k // 2
    pad4 = (pad, pad, pad, pad)
    torch.manual_seed(0)
    x = cl(torch.randn(1, cin, h, w, device="cuda").half())
    wt = (torch.randn(cout, cin, k, k, device="cuda") / math.sqrt(cin * k * k)).half()
    wcl = cl(wt)
    prep = tk.prepare_weight(wt, 1, torch.float16)
    dense = lambda: F.conv2d(x, wcl, None, 1, pad)  # noqa: E731
    t_cudnn = bench(dense)
    g = graph_of(dense)
    t_cudnn_g = bench(g.replay)
    flops = 2 * h * w * cin * cout * k * k
    row0 = {"layer": name, "cudnn_eager_ms": t_cudnn, "cudnn_graph_ms": t_cudnn_g,
            "cudnn_tflops": flops / t_cudnn / 1e9}
    print(f"\n== {name}: cuDNN fp16 eager {t_cudnn * 1e3:.1f} us, graph {t_cudnn_g * 1e3:.1f} us "
          f"({flops / t_cudnn_g / 1e9:.0f} TFLOP/s)", flush=True)
    variants = {"def": VARIANTS["def"]} if quick else VARIANTS
    for p in DENSITIES:
        xm = blob_mask(h, w, p, seed=int(p * 1000))
        if k > 1 and p < 1:  # the blob as the previous layer's dilated output would be
            xm = tk.dilate_mask(xm, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
        om = tk.dilate_mask(xm, (k, k), (1, 1), pad4, (1, 1))
        dens_in = float(xm.float().mean())
        dens_out = float(om.float().mean())
        ref = F.conv2d(torch.where(xm, x.float(), 0.0), wt.float(), None, 1, pad)
        sel = om.expand_as(ref)
        row = dict(row0, density=p, in_density=dens_in, out_density=dens_out)
        for vname, (cfg, odt) in variants.items():
            if cfg is not None and (cfg.bn > cout):
                continue
            out = cl(torch.full((1, cout, h, w), float("nan"), device="cuda", dtype=odt))

            def conv_only(cfg=cfg, out=out):
                return tk.sparse_conv2d(x, xm, wt, om, (1, 1), pad4, out=out, prepared=prep, config=cfg)

            def full(cfg=cfg, out=out):  # the per-layer work a network does: dilate the mask, then conv
                m = tk.dilate_mask(xm, (k, k), (1, 1), pad4, (1, 1))
                return tk.sparse_conv2d(x, xm, wt, m, (1, 1), pad4, out=out, prepared=prep, config=cfg)
            try:
                y, _ = conv_only()
                torch.cuda.synchronize()
                err = rel(y[sel], ref[sel]) if p > 0 else 0.0
                ok = err < (2e-3 if odt == torch.float16 else 1e-4)
                t_conv = bench(conv_only)
                t_full = bench(full) if vname == "def" else float("nan")
                gg = graph_of(full)
                t_full_g = bench(gg.replay)
                # the graph must compute the same thing
                out.fill_(float("nan"))
                gg.replay()
                torch.cuda.synchronize()
                ok = ok and (p == 0 or rel(out[sel], ref[sel]) < (2e-3 if odt == torch.float16 else 1e-4))
                t_fused_g = float("nan")
                if vname == "def":  # mask dilation fused into the tile-list launch (out_mask=None)
                    fz = lambda cfg=cfg, out=out: tk.sparse_conv2d(x, xm, wt, None, (1, 1), pad4, out=out,  # noqa: E731
                                                                   prepared=prep, config=cfg)
                    y2, m2 = fz()
                    torch.cuda.synchronize()
                    ok = ok and bool(torch.equal(m2, om)) and (p == 0 or rel(y2[sel], ref[sel]) < 2e-3)
                    t_fused_g = bench(graph_of(fz).replay)
            except Exception as e:  # keep probing the others
                traceback.print_exc()
                row[vname] = {"error": repr(e)[:300]}
                print(f"  {p:>5.0%} {vname:>12}: ERROR {e!r:.200}", flush=True)
                continue
            row[vname] = {"ok": ok, "err": err, "conv_ms": t_conv, "full_ms": t_full, "full_graph_ms": t_full_g,
                          "fused_dilation_graph_ms": t_fused_g}
            print(f"  {p:>5.0%} (out {dens_out:5.1%}) {vname:>12}: conv {t_conv * 1e3:7.1f} us  dilate+conv "
                  f"{t_full * 1e3:7.1f} us  graph {t_full_g * 1e3:7.1f} us (fused-dilation graph {t_fused_g * 1e3:5.1f})"
                  f"  x{t_cudnn_g / t_full_g:5.2f} vs cuDNN graph"
                  f"  err {err:.1e} {'OK' if ok else 'WRONG'}", flush=True)
        results.append(row)


def probe_fused(results, h=270, w=480, c=64):
    """3x3 c->c + ReLU delta update (graph-replayed): fused epilogue vs conv then sparse_nonlinear."""
    x = cl(torch.randn(1, c, h, w, device="cuda").half())
    wt = (torch.randn(c, c, 3, 3, device="cuda") / (3 * c ** 0.5)).half()
    prep = tk.prepare_weight(wt, 1, torch.float16)
    A = cl(torch.randn(1, c, h, w, device="cuda"))
    E = cl(torch.relu(A))
    for p in (0.01, 0.05, 0.25, 1.0):
        xm = blob_mask(h, w, p, 7)
        om = tk.dilate_mask(xm, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
        act = tk.Act("relu", A, E, 0.0, "max")
        A0, E0 = A.clone(), E.clone()
        # correctness of fused vs two-step on identical state
        o1, m1 = tk.sparse_conv2d(x, xm, wt, om, (1, 1), (1, 1, 1, 1), prepared=prep, act=act)
        A1, E1 = A.clone(), E.clone()
        A.copy_(A0), E.copy_(E0)
        y, ym = tk.sparse_conv2d(x, xm, wt, om, (1, 1), (1, 1, 1, 1), prepared=prep, out_dtype=torch.float32)
        o2, m2 = tk.sparse_nonlinear(y, ym, A, E, "relu", 0.0, "max", out_dtype=torch.float16)
        torch.cuda.synchronize()
        same = bool(torch.equal(m1, m2)) and rel(A1, A) < 1e-5 and rel(o1[m1.expand_as(o1)], o2[m2.expand_as(o2)]) < 1e-2
        fused = lambda: tk.sparse_conv2d(x, xm, wt, om, (1, 1), (1, 1, 1, 1), prepared=prep, act=act)  # noqa: E731

        def two():
            y, ym = tk.sparse_conv2d(x, xm, wt, om, (1, 1), (1, 1, 1, 1), prepared=prep, out_dtype=torch.float32)
            return tk.sparse_nonlinear(y, ym, A, E, "relu", 0.0, "max", out_dtype=torch.float16)
        t1, t2 = bench(graph_of(fused).replay), bench(graph_of(two).replay)
        dense_conv = lambda: torch.relu(F.conv2d(x, cl(wt), None, 1, 1))  # noqa: E731
        t4 = bench(graph_of(dense_conv).replay)
        dense_relu = lambda: torch.relu(A + 1.0) - E  # noqa: E731  (a dense masked update is >= this)
        t3 = bench(dense_relu)
        results.append({"fused_conv_relu": f"{c}@{h}x{w}", "density": p, "fused_graph_ms": t1, "two_step_graph_ms": t2,
                        "dense_elementwise_ms": t3, "cudnn_conv_relu_graph_ms": t4, "agree": same})
        print(f"  fused conv3x3 {c}->{c}+relu @{h}x{w} {p:>5.0%}: fused {t1 * 1e3:6.1f} us, conv then nonlinear "
              f"{t2 * 1e3:6.1f} us (graphs); cuDNN conv+relu graph {t4 * 1e3:6.1f} us; agree={same}", flush=True)


def probe_pointwise(results):
    h, w, c = 270, 480, 256
    for p in (0.01, 0.05, 1.0):
        m = blob_mask(h, w, p, 3)
        d = cl(torch.randn(1, c, h, w, device="cuda").half())
        A = cl(torch.randn(1, c, h, w, device="cuda"))
        E = cl(torch.relu(A))
        S = cl(torch.randn(1, c, h, w, device="cuda"))
        t_nl = bench(lambda: tk.sparse_nonlinear(d, m, A, E, "relu", 0.0, "max"))
        t_add = bench(lambda: tk.sparse_add(d, m, d, m))
        t_acc = bench(lambda: tk.accumulate_(S, d, m))
        t_dense = bench(lambda: S.add_(torch.where(m, d.float(), 0.0)))
        results.append({"pointwise": f"C={c} @270x480", "density": p, "nonlinear_ms": t_nl, "add_ms": t_add,
                        "accumulate_ms": t_acc, "dense_masked_accumulate_ms": t_dense})
        print(f"  pointwise C={c} {p:>5.0%}: nonlinear {t_nl * 1e3:6.1f} us, add {t_add * 1e3:6.1f} us, "
              f"accumulate {t_acc * 1e3:6.1f} us (dense torch.where accumulate {t_dense * 1e3:6.1f} us)", flush=True)
    x = cl(torch.randn(1, 3, 1080, 1920, device="cuda"))
    for k in (1, 3):
        ref = x.clone()
        ref[..., 500:600, 800:900] += 1.0
        t = bench(lambda: tk.sparsify(x, ref, 0.1, k, out_dtype=torch.float16))
        results.append({"sparsify": "3x1080x1920", "dilation_k": k, "ms": t})
        print(f"  sparsify 3x1080x1920 k={k}: {t * 1e3:6.1f} us", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    torch.backends.cudnn.allow_tf32 = False  # float32 references must be float32
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    t0 = time.time()
    results = []
    for L in LAYERS:
        probe_conv(*L, results, args.quick)
    print(f"[conv probe {time.time() - t0:.0f} s]", flush=True)
    extra = []
    for hwc in ((270, 480, 64), (68, 120, 256)):
        try:
            probe_fused(extra, *hwc)
        except Exception:
            traceback.print_exc()
    try:
        probe_pointwise(extra)
    except Exception:
        traceback.print_exc()
    # ---- summary table (last)
    print("\nlayer                    dens  out%   cuDNN eager/graph us   sparse graph us: def, best   speedup vs cuDNN graph")
    for r in results:
        vs = {k: v for k, v in r.items() if isinstance(v, dict) and "full_graph_ms" in v and v.get("ok")}
        vs16 = {k: v for k, v in vs.items() if not k.endswith("f32")}
        if not vs16:
            print(f"{r['layer']:24} {r['density']:>5.0%}  no correct fp16 variant")
            continue
        best = min(vs16, key=lambda k: vs16[k]["full_graph_ms"])
        b = vs16[best]
        d = vs16.get("def", b)
        fdg = d.get("fused_dilation_graph_ms", float("nan"))
        print(f"{r['layer']:24} {r['density']:>5.0%} {r['out_density']:5.1%}  {r['cudnn_eager_ms'] * 1e3:7.1f} / "
              f"{r['cudnn_graph_ms'] * 1e3:7.1f}   def {d['full_graph_ms'] * 1e3:6.1f}, {best} {b['full_graph_ms'] * 1e3:6.1f}"
              f"   x{r['cudnn_graph_ms'] / b['full_graph_ms']:5.2f} (def x{r['cudnn_graph_ms'] / d['full_graph_ms']:5.2f}; "
              f"def fused-dilation {fdg * 1e3:5.1f} us x{r['cudnn_graph_ms'] / fdg:5.2f})")
    wrong = [(r["layer"], r["density"], k) for r in results for k, v in r.items()
             if isinstance(v, dict) and ("error" in v or not v.get("ok", True))]
    print("wrong/failed variants:", wrong if wrong else "none")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "kernels_probe.json", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "conv": results, "other": extra}, f, indent=1)


if __name__ == "__main__":
    main()
