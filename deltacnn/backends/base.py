"""The narrow interface every backend implements.

Layers own their state and parameters; a backend only knows how to run one delta step of
each family of operations. The reference backend implements all of them in plain PyTorch;
faster backends subclass it and override what they accelerate, so everything they do not
override still works and stays correct.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..activations import ActSpec, truncation_score
from ..geometry import Window
from ..tensor import DeltaTensor, stream_fraction


@dataclass
class ConvParams:
    """A convolution's linear map (bias is applied by the layer on keyframes only).

    `cache` holds backend-specific derived forms of the weight (e.g. a GEMM matrix), built once
    per weight tensor rather than on every frame.
    """

    weight: Tensor  # (Cout, Cin/groups, kh, kw), compute dtype
    window: Window
    groups: int
    cache: dict = field(default_factory=dict)

    def cached(self, key: str, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@dataclass
class PointwiseState:
    """State of a nonlinear pointwise layer: accumulated input A and last emitted output E (float32)."""

    act: ActSpec
    acc: Tensor
    emitted: Tensor
    tau: float
    score: str


class Backend:
    """Delta operations on `DeltaTensor`s (non-keyframe steps). See reference.py for semantics."""

    name = "abstract"
    host_sync_ok = False  # True if the backend may read device values on the host mid-frame

    def sparsify(self, x: Tensor, ref: Tensor, tau: float, score: str, dilation: int, dtype,
                 scratch: dict | None = None) -> DeltaTensor:
        """The input layer's delta (see ReferenceBackend.sparsify). `scratch`: a dict the calling layer
        keeps between frames and empties on reset, where a backend may keep buffers of its own."""
        raise NotImplementedError

    def sparsify_blobs(self, x: Tensor, ref: Tensor, tau: float, score: str, k: int, dtype,
                       flush: list[bool] | None = None, scratch: dict | None = None,
                       want_held: bool = True) -> tuple[DeltaTensor, Tensor | None] | None:
        """The input layer's delta with the small-blob gate (deltacnn.gating, min_blob k, nothing else of
        the gate) in one pass, for backends that fuse it: the pixels whose change passes tau, opened by a
        k x k square, are sent as `sparsify` sends them; in the streams where `flush` (per stream, a
        refresh "flush" of the whole held-back change) is True every pixel that passes tau is sent. Returns
        (delta, the (N,) fraction of each stream's pixels that passed tau and were held back, or None when
        not `want_held`); None: not handled. `scratch`: as sparsify's."""
        return None

    def changed_fraction(self, x: Tensor, ref: Tensor, tau: float, score: str) -> Tensor:
        """Per stream (N,), the fraction of pixels whose change x - ref scores above tau (the input layer's change on
        frames it does not sparsify: keyframes)."""
        return stream_fraction(truncation_score(x.float() - ref, score) > tau)

    def frame_range(self, x: Tensor) -> tuple[list[float], list[float]]:
        """Per stream (batch row) of a CPU frame batch, its least and largest value; NaN propagates and
        infinities are kept (the model's input check reads both)."""
        flat = x.permute(0, 2, 3, 1) if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else x
        lo, hi = torch.aminmax(flat.reshape(x.shape[0], -1), dim=1)
        return lo.tolist(), hi.tolist()

    def accumulate(self, state: Tensor, d: DeltaTensor) -> None:
        raise NotImplementedError

    def conv2d(self, d: DeltaTensor, p: ConvParams) -> DeltaTensor:
        raise NotImplementedError

    def conv_block(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None,
                   act: PointwiseState | None) -> DeltaTensor:
        raise NotImplementedError

    def pointwise(self, d: DeltaTensor, st: PointwiseState) -> DeltaTensor:
        raise NotImplementedError

    def fuses_conv_bias(self, x: Tensor) -> bool:
        """Whether `seed_act` may run and add the bias for a conv on tensors like x (the conv leaves it out)."""
        return False

    def seed_act(self, y: Tensor, residual: Tensor | None, acc: Tensor | None, emitted: Tensor | None,
                 act: ActSpec, bias: Tensor | None = None) -> bool:
        """Dense frame of a conv's bias + residual add + nonlinear update in one pass, for backends that
        fuse it: y = f(y + bias + residual) in place (y's dtype, f in float32); on keyframes also
        acc = y + bias + residual, emitted = f(...) as sent (both float32, overwritten); acc and emitted
        are None on stateless dense frames. False: nothing done (y unchanged), the layer adds the bias
        and runs its generic PyTorch path."""
        return False

    def fuses_dense_conv(self, x: Tensor) -> bool:
        """Whether `dense_conv` may run on tensors like x at all (asked before the layer builds its
        ConvParams); the conv's own arguments can still make dense_conv decline."""
        return False

    def reads_channel_views(self, x: Tensor) -> bool:
        """Whether this backend's keyframe paths take a channel slice of a channels_last map like x as a
        keyframe's values in place (tensor.channel_view: pixel rows strided), so that a keyframe's
        DeltaSlice need not copy it. Only the layers' keyframe paths (dense convs, cat, add, pooling,
        resampling, state seeds) ever see such values; delta frames carry row matrices, except on the Triton
        backend, whose channel_slice returns views (its kernels read them at their pixel strides)."""
        return False

    def dense_conv(self, x: Tensor, p: ConvParams, bias: Tensor | None, residual: Tensor | None,
                   act: ActSpec | None, state: Callable[[tuple[int, ...]], tuple[Tensor, Tensor]] | None,
                   parts: tuple[Tensor, ...] | None = None) -> Tensor | None:
        """Dense frame of a conv with its bias, residual add and activation in one pass, for backends
        that fuse it: returns out = f(conv(x) + bias + residual) (channels_last, float32). On keyframes
        `state(shape)` gives the activation's A and E buffers (float32 channels_last of the output's
        shape), which the pass overwrites with A = conv(x) + bias + residual and E = out; the backend
        may return E itself as out. `state` is None on stateless dense frames and for convs without an
        activation. `parts`: x is a placeholder, the input is the channel cat of these maps (dense_cat_in_place).
        None: nothing done, the layer runs its generic path."""
        return None

    def dense_cat_in_place(self, ds: list[DeltaTensor]) -> DeltaTensor | None:
        """A dense frame's (keyframe's) channel cat whose one consumer is a 1x1 conv with an activation (as
        cat_in_place), for backends whose dense_conv reads the parts in place: a keyframe DeltaTensor whose
        values are a placeholder of the cat's shape and whose parts are the inputs (the cat is never written).
        None: not handled, the layer runs torch.cat."""
        return None

    def upsample_nearest(self, d: DeltaTensor, factors: tuple[int, int]) -> DeltaTensor | None:
        """Nearest upsampling of a delta by integer factors (sy, sx) (output pixel (y, x) is input pixel
        (y // sy, x // sx), values and mask alike), for backends that run it on the updated pixels alone;
        None: not handled, the layer runs the op on the zero-filled delta (dense_linear)."""
        return None

    def cat_in_place(self, ds: list[DeltaTensor]) -> DeltaTensor | None:
        """A delta frame's channel cat whose one consumer is a 1x1 conv with an activation (stride 1, no padding,
        groups 1), for backends whose conv reads the parts in place: the cat's mask and updated pixels, the
        parts kept as DeltaTensor.parts, no rows written (a YOLOv8n delta frame's 13 cats copied ~1 ms of rows
        that their convs read once). None: not handled, the layer runs `cat`."""
        return None

    def add(self, a: DeltaTensor, b: DeltaTensor) -> DeltaTensor:
        raise NotImplementedError
