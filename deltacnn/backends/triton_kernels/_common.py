"""Shared pieces of the Triton kernels: activation codes, the fused nonlinear epilogue, launch helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...activations import SCORE_CODES
from ...tensor import channel_view

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# activation codes (constexpr inside kernels)
ACT_CODES = {"none": 0, "identity": 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "silu": 4, "hardswish": 5,
             "hardsigmoid": 6, "sigmoid": 7, "tanh": 8, "gelu": 9, "gelu_tanh": 10, "hardtanh": 11, "elu": 12}


@dataclass
class Act:
    """Fused nonlinear delta update: A += y; o = f(A) - E; emit where score(o) > tau; E += o there.

    `fn` is one of ACT_CODES; `slope` (leaky_relu), `min_val`/`max_val` (hardtanh) and `alpha` (elu)
    parametrise it. `acc` (A) and `emitted` (E) are float32 (N, C, H, W) channels_last states of the
    output's shape; both are updated in place.
    """

    fn: str
    acc: Tensor
    emitted: Tensor
    tau: float = 0.0
    score: str = "max"
    slope: float = 0.01
    min_val: float = -1.0
    max_val: float = 1.0
    alpha: float = 1.0

    @classmethod
    def from_spec(cls, spec, acc: Tensor, emitted: Tensor, tau: float, score: str = "max") -> "Act":
        """Build from a deltacnn.activations.ActSpec (prelu is not supported here)."""
        fn = spec.kind
        if fn == "gelu" and getattr(spec, "approximate", "none") == "tanh":
            fn = "gelu_tanh"
        return cls(fn, acc, emitted, tau, score, spec.slope, spec.min_val, spec.max_val, spec.alpha)

    def code(self) -> int:
        if self.fn not in ACT_CODES:
            raise ValueError(f"activation {self.fn!r} not supported by the Triton kernels; known: {sorted(ACT_CODES)}")
        return ACT_CODES[self.fn]

    def score_code(self) -> int:
        if self.score not in SCORE_CODES:
            raise ValueError(f"truncation score must be 'max' or 'l2', got {self.score!r}")
        return SCORE_CODES[self.score]


def as_act(act) -> Act | None:
    if act is None or isinstance(act, Act):
        return act
    if isinstance(act, dict):
        return Act(**act)
    raise TypeError(f"act must be an Act, a dict or None, got {type(act)}")


def check_state(t: Tensor, shape, name: str) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    if not is_cl(t):
        raise ValueError(f"{name} must be channels_last")


def is_cl(t: Tensor) -> bool:
    """True when the (N, C, H, W) tensor's memory is a dense NHWC block."""
    n, c, h, w = t.shape
    return t.stride() == (h * w * c, 1, w * c, c) or t.numel() == 0 or \
        t.permute(0, 2, 3, 1).is_contiguous()


def pixel_stride(t: Tensor, name: str) -> int:
    """Elements between consecutive pixels of a (N, C, H, W) map that is channels_last or a channel slice of
    a channels_last map (tensor.channel_view: C2f's halves, read in place by the convs); raises otherwise."""
    if is_cl(t):
        return t.shape[1]
    if channel_view(t):
        return t.stride(3)
    raise ValueError(f"{name} must be (N, C, H, W) in channels_last memory, or a channel slice of such a map")


def need_cl(t: Tensor, name: str) -> Tensor:
    if not is_cl(t):
        raise ValueError(f"{name} must be (N, C, H, W) in channels_last memory")
    return t


def mask_u8(m: Tensor, shape, name: str) -> Tensor:
    """A (N, 1, H, W) bool mask viewed as contiguous uint8."""
    if m.dtype != torch.bool or tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name} must be bool of shape {tuple(shape)}, got {m.dtype} {tuple(m.shape)}")
    if not m.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return m.view(torch.uint8)


def new_cl(n: int, c: int, h: int, w: int, dtype, device) -> Tensor:
    return torch.empty(n, h, w, c, dtype=dtype, device=device).permute(0, 3, 1, 2)


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 2
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


@dataclass(frozen=True)
class SMLimits:
    """What one multiprocessor holds (CUDA's per-SM limits)."""

    regs: int = 65536
    threads: int = 2048
    shared: int = 233472
    blocks: int = 32


_LIMITS: dict = {}


def sm_limits(device: torch.device) -> SMLimits:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _LIMITS:
        p = torch.cuda.get_device_properties(key)
        d = SMLimits()
        _LIMITS[key] = SMLimits(getattr(p, "regs_per_multiprocessor", d.regs),
                                getattr(p, "max_threads_per_multi_processor", d.threads),
                                getattr(p, "shared_memory_per_multiprocessor", d.shared), d.blocks)
    return _LIMITS[key]


def resident_programs(n_regs: int, num_warps: int, shared: int, lim: SMLimits = SMLimits()) -> int:
    """Programs of a kernel that an SM runs at once: registers (per thread, rounded up to 8, allocated per
    warp in units of 256, warps in groups of 4), threads, shared memory (1 KiB reserved per program) and
    the program limit; at least 1. 230-255 registers at 4 warps: 2; 168: 3."""
    per_warp = -(-max(1, n_regs) // 8) * 8 * 32
    per_warp = -(-per_warp // 256) * 256
    warps = (lim.regs // per_warp) // 4 * 4
    by_regs = warps // num_warps
    by_threads = lim.threads // (32 * num_warps)
    by_shared = lim.shared // (shared + 1024)
    return max(1, min(by_regs, by_threads, by_shared, lim.blocks))


def kernel_residency(kernel, device: torch.device) -> int | None:
    """resident_programs of a compiled Triton kernel (what a launch returns), or None where its resources
    are unknown (the interpreter, a Triton without them)."""
    if INTERPRET or device.type != "cuda" or kernel is None:
        return None
    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
        kernel._init_handles()
    regs, meta = getattr(kernel, "n_regs", None), getattr(kernel, "metadata", None)
    if not regs or meta is None:
        return None
    return resident_programs(int(regs), int(meta.num_warps), int(getattr(meta, "shared", 0) or 0), sm_limits(device))


# Programmatic dependent launch (Hopper and later): each kernel is launched with `launch_pdl` and
# begins with griddepcontrol.wait, so the next kernel is launched while the previous one drains
# instead of after it (a delta frame is ~90 short launches). The wait comes before every memory
# access, so results are the same. Modes: "exit": the next kernel launches as the programs exit;
# "early": each program lets the next kernel launch right after its wait; "auto": early for short
# kernels, at exit for the persistent convs; "short": early for short kernels, the convs launched
# plainly; "off": plain launches. A module setting so that benchmarks can compare. H100, R50 1080p
# fp16, ms per frame (benchmarks/gpu_variants.py run 14; off / exit / early-for-short-kernels):
# b1 5% 1.06-1.07 / 1.05 / 1.07, b8 5% 4.92-4.96 / 4.90-4.91 / 5.04-5.06. Programs placed early
# and waiting on the SMs cost the running kernel more than the earlier launch saves at batch 8.
# H200, YOLOv8n on vtest.avi, ms a delta frame (session 21, benchmarks/gpu_yolo.py --conv-ab, same process;
# exit / auto / early): b1 0.934 / 0.888 / 0.912 and 0.925 / 0.883, 0.888; 16 streams 2.08 / 2.11, 2.14. "auto"
# for the single camera's latency (-5%), at 1-3% of the 16-stream rate.
PDL = "auto"
_CAPS: dict = {}


def launch_opts(device: torch.device, long_running: bool = False) -> dict:
    """Extra launch arguments for a kernel that takes `GDC: tl.constexpr` and starts with gdc_start
    (`long_running`: a persistent kernel that may run long, see PDL)."""
    if INTERPRET or PDL not in ("early", "exit", "auto", "short") or device.type != "cuda" or \
            (PDL == "short" and long_running):
        return {"GDC": 0}
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _CAPS:
        _CAPS[key] = torch.cuda.get_device_capability(key)[0] >= 9
    if not _CAPS[key]:
        return {"GDC": 0}
    early = PDL == "early" or (PDL in ("auto", "short") and not long_running)
    return {"GDC": 2 if early else 1, "launch_pdl": True}


@triton.jit
def gdc_start(GDC: tl.constexpr):
    """First statement of every kernel (GDC > 0 under programmatic dependent launch): wait until the
    previous kernel in the stream has finished and its writes are visible; GDC 2: then let the next
    kernel launch (its programs wait here in turn)."""
    if GDC > 0:
        tl.extra.cuda.gdc_wait()
    if GDC == 2:
        tl.extra.cuda.gdc_launch_dependents()


def npow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


# ------------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def apply_act(x, FN: tl.constexpr, slope, min_val, max_val, alpha):
    """f(x) for float32 x; FN is an ACT_CODES value."""
    if FN == 1:
        y = tl.maximum(x, 0.0)
    elif FN == 2:
        y = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif FN == 3:
        y = tl.where(x > 0, x, x * slope)
    elif FN == 4:
        y = x * _sigmoid(x)
    elif FN == 5:
        y = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) * (1.0 / 6.0)
    elif FN == 6:
        y = tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) * (1.0 / 6.0)
    elif FN == 7:
        y = _sigmoid(x)
    elif FN == 8:
        y = 2.0 * _sigmoid(2.0 * x) - 1.0
    elif FN == 9:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif FN == 10:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + (2.0 * _sigmoid(2.0 * u) - 1.0))
    elif FN == 11:
        y = tl.minimum(tl.maximum(x, min_val), max_val)
    elif FN == 12:
        y = tl.where(x > 0, x, alpha * (tl.exp(tl.minimum(x, 0.0)) - 1.0))
    else:
        y = x
    return y


@triton.jit
def emit_truncated(o, e, cand, m2, cvalid, offs, prow, pvalid, out_ptr, e_ptr, fm_ptr, tau, SCORE: tl.constexpr,
                   OR_FM: tl.constexpr):
    """Truncation shared by every nonlinear delta kernel: candidate change `o` (float32 [P, C], E = `e`)
    is emitted at pixels whose score over channels (max |o| or L2) exceeds tau; E records what was sent.

    OR_FM (only for tau <= 0): this tile holds only some of the pixel's channels. With tau <= 0 a
    pixel is emitted iff any channel changed, which each tile can see for its own channels: it writes
    its channels at every candidate (zeros where nothing changed, so E += 0 there) and sets the flag
    where one of its channels changed. The flags were cleared before the launch, so they OR up.
    """
    o = tl.where(m2, o, 0.0)
    o_r = o.to(out_ptr.dtype.element_ty)
    if OR_FM:
        # any nonzero channel (not the L2 norm, whose square could underflow to 0 for a tiny change)
        emit = cand & (tl.max(tl.abs(o), axis=1) > tau)
        tl.store(out_ptr + offs, o_r, mask=m2)
        tl.store(e_ptr + offs, e + o_r.to(tl.float32), mask=m2)
        tl.store(fm_ptr + prow, tl.full([o.shape[0]], 1, tl.uint8), mask=emit & pvalid)
    else:
        if SCORE == 0:
            s = tl.max(tl.abs(o), axis=1)
        else:
            s = tl.sqrt(tl.sum(o * o, axis=1))
        emit = cand & (s > tau)
        m3 = emit[:, None] & cvalid[None, :]
        tl.store(out_ptr + offs, o_r, mask=m3)
        tl.store(e_ptr + offs, e + o_r.to(tl.float32), mask=m3)
        tl.store(fm_ptr + prow, emit.to(tl.uint8), mask=pvalid)


@triton.jit
def finish_tile(acc, prow, pvalid, omask, rmask, cols, cvalid, C, RS,
                out_ptr, res_ptr, rmask_ptr, a_ptr, e_ptr, fm_ptr,
                slope, min_val, max_val, alpha, tau,
                HAS_RES: tl.constexpr, HAS_ACT: tl.constexpr, FN: tl.constexpr, SCORE: tl.constexpr,
                WRITE_FM: tl.constexpr, OR_FM: tl.constexpr, LOADS_FIRST: tl.constexpr):
    """Epilogue for a [P, C] float32 tile `acc` of pixels `prow` (int64 rows of a (pixels, C) matrix).

    Adds the residual (its pixels RS elements apart: a channel slice of a wider map reads in place) where its
    mask is set; without an activation stores acc at candidate pixels
    (omask | residual mask) and, if WRITE_FM, the candidate mask; with one runs the nonlinear delta
    update (all C channels must be in this tile, or OR_FM: see emit_truncated) and writes the emit mask
    for every valid pixel (OR_FM: sets it where this tile's channels changed).

    LOADS_FIRST: `rmask` is the residual mask, loaded by the caller before its main loop, and E is
    loaded together with A, before A is stored (a store to a pointer the compiler cannot prove
    distinct keeps later loads behind it: one memory round trip more per tile). Otherwise the
    residual mask is loaded here from rmask_ptr and E after the A store.
    """
    cand = omask
    offs = prow[:, None] * C + cols[None, :]
    if HAS_RES:
        if LOADS_FIRST:
            rm = rmask
        else:
            rm = tl.load(rmask_ptr + prow, mask=pvalid, other=0) != 0
        r = tl.load(res_ptr + prow[:, None] * RS + cols[None, :], mask=rm[:, None] & cvalid[None, :], other=0.0)
        acc = acc + r.to(tl.float32)
        cand = cand | rm
    m2 = cand[:, None] & cvalid[None, :]
    if HAS_ACT:
        a = tl.load(a_ptr + offs, mask=m2, other=0.0)
        if LOADS_FIRST:
            e = tl.load(e_ptr + offs, mask=m2, other=0.0)
            a += acc
            tl.store(a_ptr + offs, a, mask=m2)
        else:
            a += acc
            tl.store(a_ptr + offs, a, mask=m2)
            e = tl.load(e_ptr + offs, mask=m2, other=0.0)
        o = apply_act(a, FN, slope, min_val, max_val, alpha) - e
        emit_truncated(o, e, cand, m2, cvalid, offs, prow, pvalid, out_ptr, e_ptr, fm_ptr, tau, SCORE, OR_FM)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m2)
        if WRITE_FM:
            tl.store(fm_ptr + prow, cand.to(tl.uint8), mask=pvalid)
