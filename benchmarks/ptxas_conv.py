"""Registers and spills of the sparse conv kernels as sparse_conv2d would launch them, compiled offline for
sm_90a (no GPU needed): the launch is captured on CPU tensors (its constexprs, argument dtypes and launch
options), compiled with triton.compile (pointer and 16-divisible int hints as a real launch gives them),
and the PTX fed to ptxas -v. Why: a capped kernel's spills and the registers that set how many programs
fit an SM are invisible in a profile.

    python3 benchmarks/ptxas_conv.py [--shapes yolo] [--maxnreg default|none|168|...] [--tau 0.05]
Each row: layer shape, config (bn, tile, warps, stages, split, maxnreg), whether the nonlinear update is
fused, registers, spill stores/loads (bytes), programs per SM at 4 warps.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import replace

import torch

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from deltacnn.backends.triton_kernels import conv as C  # noqa: E402
from deltacnn.backends.triton_kernels._common import Act, resident_programs  # noqa: E402

# YOLOv8n convs at 640x480-ish (vtest 768x576): (name, cin, cout, k, stride, in_hw, act)
YOLO = [
    ("m22.cv2.0.0 64->64 k3", 64, 64, 3, 1, (72, 96), True),
    ("m6.m.0.cv1 64->64 k3", 64, 64, 3, 1, (36, 48), True),
    ("m16 64->64 k3 s2", 64, 64, 3, 2, (72, 96), True),
    ("m4.m.0.cv1 32->32 k3", 32, 32, 3, 1, (72, 96), True),
    ("m4.cv1 64->64 k1", 64, 64, 1, 1, (72, 96), True),
    ("m22.cv3.0.1 80->80 k3", 80, 80, 3, 1, (72, 96), True),
    ("m8.m.0.cv1 128->128 k3", 128, 128, 3, 1, (18, 24), True),
    ("m6.cv1 128->128 k1", 128, 128, 1, 1, (36, 48), True),
    ("m7 128->256 k3 s2", 128, 256, 3, 2, (36, 48), True),
    ("m8.cv1 256->256 k1", 256, 256, 1, 1, (18, 24), True),
    ("m9.cv2 512->256 k1", 512, 256, 1, 1, (18, 24), True),
    ("m22.cv2.1.0 128->64 k3", 128, 64, 3, 1, (36, 48), True),
    ("m22.cv2.0.2 64->64 k1 linear", 64, 64, 1, 1, (72, 96), False),
]
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def capture(cin: int, cout: int, k: int, s: int, hw: tuple[int, int], act: bool, tau: float,
            config: C.ConvConfig | None) -> list[tuple]:
    """The (kernel, args, kwargs, cfg) of every conv launch sparse_conv2d makes for this shape (CPU tensors)."""
    got = []
    real_tiles, real_launch = C.active_tiles, C._launch

    def fake_tiles(out_mask, rmask, th, tw, *a, n_ctr=0, dilate_from=None, count=None, pixels=False, **kw):
        n, _, ho, wo = (out_mask.shape if out_mask is not None else (1, 1, *dilate_from[-1]))
        nt = triton.cdiv(ho, th) * triton.cdiv(wo, tw)
        ids = torch.zeros(n * ho * wo if pixels else nt, dtype=torch.int32)
        return (ids, torch.zeros(2, dtype=torch.int32), (nt * n, triton.cdiv(wo, tw), nt),
                torch.zeros(max(1, nt * n_ctr), dtype=torch.int32), torch.zeros(n, 1, ho, wo, dtype=torch.bool))

    def fake_launch(kernel, work, cfg, dev, args, kw):
        got.append((kernel, args, kw, cfg))

    C.active_tiles, C._launch = fake_tiles, fake_launch
    try:
        h, w = hw
        x = torch.zeros(1, h, w, cin, dtype=torch.float16).permute(0, 3, 1, 2)
        xm = torch.zeros(1, 1, h, w, dtype=torch.bool)
        wt = torch.zeros(cout, cin, k, k, dtype=torch.float16)
        pad = (k // 2,) * 4
        ho, wo = C.out_size(h, w, (k, k), (s, s), pad, (1, 1))
        a = None
        if act:
            st = torch.zeros(1, ho, wo, cout, dtype=torch.float32).permute(0, 3, 1, 2)
            a = Act("silu", st, st.clone(), tau)
        # the two-pass form (conv + sparse_nonlinear) launches the pointwise kernel too: not captured
        real_nl = C.sparse_nonlinear
        C.sparse_nonlinear = lambda y, ym, *r, **kw: (y, ym)
        try:
            C.sparse_conv2d(x, xm, wt, None, (s, s), pad, act=a, out_dtype=torch.float16 if act else torch.float32,
                            config=config, counter=torch.zeros(2, dtype=torch.int32))
        finally:
            C.sparse_nonlinear = real_nl
    finally:
        C.active_tiles, C._launch = real_tiles, real_launch
    return got


def _type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                      torch.uint8: "u8", torch.bool: "u8", torch.int64: "i64"}[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    return "fp32"


def compile_regs(kernel, args: tuple, kw: dict, maxnreg: int | None) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of the kernel compiled offline for sm_90a."""
    fn = kernel
    names = fn.arg_names
    kw = dict(kw)
    warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
    kw.pop("maxnreg", None)
    kw.pop("launch_pdl", None)
    kw["GDC"] = 1  # the H200 launches use programmatic dependent launch
    sig, consts, attrs = {}, dict(kw), {}
    for i, (name, v) in enumerate(zip(names, args)):
        if isinstance(v, int) and not isinstance(v, bool) and v == 1:
            consts[name] = 1  # Triton specialises ints equal to 1
            continue
        sig[name] = _type(v)
        if isinstance(v, torch.Tensor) or (isinstance(v, int) and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in consts:
        sig[name] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    opts = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    ck = triton.compile(src, target=target, options=backend.parse_options(opts).__dict__)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ck.asm["ptx"])
        r = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", p, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    txt = r.stderr + r.stdout
    regs = int(re.search(r"Used (\d+) registers", txt).group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    return regs, int(m.group(1)), int(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tau", type=float, default=0.05, help="the activations' threshold (> 0: score over channels)")
    ap.add_argument("--maxnreg", default="default", help="default (the heuristic's), none, or a number")
    ap.add_argument("--only", default="", help="substring of the layer names to run")
    ap.add_argument("--warps", type=int, default=0, help="override the heuristic's warps (0: keep)")
    ap.add_argument("--tile", default="", help="override the heuristic's output tile, e.g. 4x8")
    ap.add_argument("--stages", type=int, default=0, help="override the heuristic's pipeline depth (0: keep)")
    args = ap.parse_args()
    base_config = C.default_config

    def patched(*a, **kw):
        cfg = base_config(*a, **kw)
        if args.warps:
            cfg = replace(cfg, num_warps=args.warps)
        if args.tile:
            th, tw = map(int, args.tile.split("x"))
            cfg = replace(cfg, th=th, tw=tw)
        if args.stages:
            cfg = replace(cfg, num_stages=args.stages)
        return cfg

    C.default_config = patched
    print(f"triton {triton.__version__}, sm_90a offline, tau {args.tau}, maxnreg {args.maxnreg}")
    print(f"{'layer':32s} {'bn':>4s} {'tile':>5s} {'w':>2s} {'st':>2s} {'sk':>2s} {'cap':>4s} {'fused':>5s} "
          f"{'regs':>4s} {'spill st/ld':>12s} {'prog/SM':>7s}")
    for name, cin, cout, k, s, hw, act in YOLO:
        if args.only and args.only not in name:
            continue
        for kernel, a, kw, cfg in capture(cin, cout, k, s, hw, act, args.tau, None):
            cap = cfg.maxnreg if args.maxnreg == "default" else None if args.maxnreg == "none" else int(args.maxnreg)
            regs, st, ld = compile_regs(kernel, a, kw, cap)
            fused = kw.get("HAS_ACT", False)
            print(f"{name:32s} {kw['BN']:4d} {cfg.th}x{cfg.tw:<3d} {kw['num_warps']:2d} {kw['num_stages']:2d} "
                  f"{kw['SPLIT_K']:2d} {str(cap):>4s} {str(bool(fused)):>5s} {regs:4d} {f'{st}/{ld}':>12s} "
                  f"{resident_programs(regs, kw['num_warps'], 0):7d}", flush=True)


if __name__ == "__main__":
    main()
