"""Count the kernel launches of one YOLOv8n delta frame on the Triton backend, on the CPU.

Runs the triton backend under TRITON_INTERPRET=1 (no GPU needed): Triton launches are counted with a
hook on the interpreter, PyTorch ops that launch a kernel on a GPU with a TorchDispatchMode (views,
empty allocations and scalar reads left out), each attributed to the deltacnn function that issued it.
The counts depend on the network and the backend's code paths, not on the input size, so a 64x64
frame is enough (a few minutes on 2 cores, most of it the interpreter). What it is for: the floor of a
delta frame on a GPU is mostly launches (issue 13 item 3); this says where they come from.

    TRITON_INTERPRET=1 python3 benchmarks/gpu_launch_count.py [--size 64 64] [--threshold 0]
"""
from __future__ import annotations

import argparse
import collections
import os
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import deltacnn  # noqa: E402

# aten ops that launch nothing on a GPU (views, allocations, metadata, scalar reads)
NO_LAUNCH = {"empty", "empty_strided", "view", "permute", "as_strided", "_unsafe_view", "slice", "select", "expand",
             "alias", "unsqueeze", "squeeze", "t", "transpose", "detach", "lift_fresh", "reshape", "split", "chunk",
             "unbind", "narrow", "split_with_sizes", "is_nonzero", "item", "_local_scalar_dense", "promote_types",
             "scalar_tensor"}  # scalar_tensor: the host-side wrapper of a Python number


def _site() -> str:
    """The innermost deltacnn function (outside the Triton kernel wrappers) on the stack."""
    for fr in reversed(traceback.extract_stack()[:-3]):
        if "/deltacnn/" in fr.filename and "triton_kernels" not in fr.filename:
            return fr.filename.split("/deltacnn/")[-1] + ":" + fr.name
    return "?"


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_triton and name not in NO_LAUNCH:
            self.ops[name] += 1
            self.sites[f"{_site()} {name}"] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    ap.add_argument("--threshold", type=float, default=0.0)
    args = ap.parse_args()
    import triton.runtime.interpreter as ti
    from deltacnn.tasks.yolov8 import YOLOv8Task

    counter = _Counter()
    kernels: collections.Counter = collections.Counter()
    run = ti.InterpretedFunction.run

    def counted_run(self, *a, **k):
        kernels[self.fn.__name__] += 1
        counter.inside_triton += 1  # the interpreter's own tensor copies are no launches
        try:
            return run(self, *a, **k)
        finally:
            counter.inside_triton -= 1

    ti.InterpretedFunction.run = counted_run
    model = YOLOv8Task().load_model().eval()
    torch.manual_seed(0)
    h, w = args.size
    x0 = torch.rand(1, 3, h, w)
    dm = deltacnn.convert(model, x0, threshold=args.threshold, dtype=torch.float32, backend="triton",
                          dense_above=None)
    with torch.no_grad():
        dm(x0)
        x1 = x0.clone()
        x1[:, :, h // 6:h // 2, w // 6:w // 2] += 0.3
        dm(x1)  # the first delta frame allocates; count the second
        x2 = x1.clone()
        x2[:, :, h // 3:2 * h // 3, w // 3:2 * w // 3] -= 0.2
        kernels.clear()
        with counter:
            dm(x2)
    print(f"one delta frame: {sum(kernels.values())} Triton launches, {sum(counter.ops.values())} PyTorch launches")
    print("Triton:", ", ".join(f"{k} {v}" for k, v in kernels.most_common()))
    print("PyTorch:", ", ".join(f"{k} {v}" for k, v in counter.ops.most_common()))
    for k, v in counter.sites.most_common(40):
        print(f"  {v:4d}  {k}")


if __name__ == "__main__":
    main()
