"""Pixel layouts of densely computed tensors: which of their elements are pixels of a feature map.

The converter computes some values densely: a part of unbind times a tensor from a dense branch, a
softmax over a flattened map, a box decode. Whether such a value is still a feature map decides what
the work on it is: on a map of the stream it is feature-map work (a dense island, which needs
`allow_dense_fallback`); otherwise it comes after the last feature maps (a dense tail, allowed: a box
decode's (b, 16, 4, anchors) bins, a classifier's vectors). A `Layout` records, for every dim of a
tensor, the factors its index is made of, outermost first (a flattened map's last dim is rows then
columns):

- ``n``: the batch, whole (kept even when it has size 1);
- ``h`` / ``w``: the rows / columns of one stream grid (identified by the grid's (H, W)); a slice of
  them keeps the label;
- ``?``: anything else (channels, box sides, the anchors of several grids concatenated ...).

Other size-1 dims have no factors. `lost` holds the pixel axes indexed away (a row of ``unbind(2)``), so
that stacking or concatenating such parts back along one dim makes it a pixel dim again.

The rules follow only ops whose element order is known: reshapes, permutes, indexing, cat and stack,
elementwise ops with broadcasting, reductions over given dims (a max over channels is still a map), and
ops whose output has the shape of an input (softmax, cumsum, normalisation: they keep every element
where it is). A Linear, conv or batched matmul on values that keep the batch as dim 0 keeps it there
(`per_image`). Any other op ends the tracking (None). Which layouts are feature maps: `is_map`; what the
converter does with them: `deltacnn.convert._Converter._reenter`. Multiply-adds on a value whose dim 0 is
no longer the whole batch, or whose layout is unknown (`batch_first` false: x.view(N * C, 1, H, W), a
permute that moves the batch), may be work on the stream's pixels: a dense island, needing permission
(`deltacnn.convert._Converter._island_off_the_batch`), unless no pixel is left in it (`has_pixels`: a
batch of one's pooled vector squeezed to (C,) is a tail's). Tails keep the batch first or hold no pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

PIXEL = ("h", "w")


class Factor(NamedTuple):
    """One factor of a dim's index: what it counts and how many."""

    kind: str  # "n", "h", "w" or "?"
    size: int
    grid: tuple[int, int] | None = None  # (H, W) of the stream grid, for "h" and "w"


@dataclass(frozen=True)
class Layout:
    """Per dim of a tensor, its factors outermost first; `lost`: the (axis, grid) pixel axes indexed away."""

    dims: tuple[tuple[Factor, ...], ...]
    lost: frozenset[tuple[str, tuple[int, int]]] = frozenset()


def _other(size: int) -> tuple[Factor, ...]:
    return (Factor("?", size),) if size > 1 else ()


def _is_pixel(fs: tuple[Factor, ...]) -> bool:
    return len(fs) == 1 and fs[0].kind in PIXEL


def of_map(shape: Sequence[int]) -> Layout | None:
    """The layout of a (N, C, H, W) stream: batch, channels, rows and columns of its own grid."""
    if len(shape) != 4:
        return None
    n, c, h, w = (int(s) for s in shape)
    grid = (h, w)
    return Layout(((Factor("n", n),), _other(c), (Factor("h", h, grid),) if h > 1 else (),
                   (Factor("w", w, grid),) if w > 1 else ()))


def reshape(lay: Layout, in_shape: Sequence[int], out_shape: Sequence[int]) -> Layout | None:
    """view / reshape / flatten / unflatten / squeeze / unsqueeze: the same elements in the same order,
    regrouped. A factor split across dims loses its label; a batch moved off dim 0 ends the tracking."""
    in_shape, out_shape = list(in_shape), list(out_shape)
    dims = list(lay.dims)
    head: list[tuple[Factor, ...]] = []
    if dims and dims[0][:1] and dims[0][0].kind == "n":
        if dims[0] == (Factor("n", 1),) and (not out_shape or out_shape[0] != 1):
            dims = dims[1:]  # a batch of one squeezed or merged away: the other factors are followed
        elif dims[0] != (Factor("n", in_shape[0]),) or not out_shape or out_shape[0] != in_shape[0]:
            return None  # the batch merged with or split into other dims: no longer a map of images
        else:
            head, dims, out_shape = [dims[0]], dims[1:], out_shape[1:]
    factors = [f for d in dims for f in d if f.size > 1]
    out: list[tuple[Factor, ...]] = []
    i = 0
    for s in out_shape:
        dim: list[Factor] = []
        while s > 1:
            if i >= len(factors):
                return None
            f = factors[i]
            if s % f.size == 0:  # the whole factor fits in this dim
                dim.append(f)
                s //= f.size
                i += 1
            elif f.size % s == 0:  # the factor is split: its outer part goes here, unlabelled
                dim.append(Factor("?", s))
                factors[i] = Factor("?", f.size // s)
                s = 1
            else:
                return None
        out.append(tuple(dim))
    if i != len(factors):
        return None
    return Layout(tuple(head + out), lay.lost)


def permute(lay: Layout, order: Sequence[int]) -> Layout | None:
    """permute / transpose / swapaxes: the dims reordered."""
    if sorted(d % len(lay.dims) for d in order) != list(range(len(lay.dims))):
        return None
    return Layout(tuple(lay.dims[d % len(lay.dims)] for d in order), lay.lost)


def index(lay: Layout, shape: Sequence[int], idx: tuple) -> Layout | None:
    """x[idx] with static ints, slices, None and one Ellipsis (also select, narrow, unbind's parts)."""
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if idx.count(Ellipsis) > 1 or n_real > len(shape):
        return None
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(shape) - n_real) + idx[k + 1:]
    dims: list[tuple[Factor, ...]] = []
    lost = set(lay.lost)
    src = iter(zip(lay.dims, shape))
    for i in idx:
        if i is None:
            dims.append(())
            continue
        try:
            fs, size = next(src)
        except StopIteration:
            return None
        if isinstance(i, bool) or not isinstance(i, (int, slice)):
            return None
        if isinstance(i, int):
            if _is_pixel(fs):
                lost.add((fs[0].kind, fs[0].grid))
            continue
        m = len(range(*i.indices(size)))
        if m == size:
            dims.append(fs)
        elif _is_pixel(fs):
            dims.append((Factor(fs[0].kind, m, fs[0].grid),) if m > 1 else ())
            if m == 1:
                lost.add((fs[0].kind, fs[0].grid))
        else:
            dims.append(_other(m))  # part of channels, of merged dims, or some images of the batch
    dims.extend(fs for fs, _ in src)
    return Layout(tuple(dims), frozenset(lost))


def reduce(lay: Layout, dims: Sequence[int], keepdim: bool) -> Layout:
    """sum / mean / amax ... over `dims`: those dims go (or stay, with size 1); the others keep their labels."""
    gone = {d % len(lay.dims) for d in dims}
    return Layout(tuple(() if i in gone else fs for i, fs in enumerate(lay.dims) if keepdim or i not in gone),
                  lay.lost)


def _regained(layouts: Sequence[Layout]) -> tuple[str, tuple[int, int]] | None:
    """The pixel axis every part lost (parts of one unbind put back together), if exactly one."""
    common = frozenset.intersection(*(lay.lost for lay in layouts))
    return next(iter(common)) if len(common) == 1 else None


def cat(layouts: Sequence[Layout | None], shapes: Sequence[Sequence[int]], dim: int) -> Layout | None:
    """torch.cat along `dim`: the other dims must agree; the joined dim stays a pixel dim when every part
    is a piece of the same pixel axis (a slice of it, or one of its indexed-away rows unsqueezed)."""
    if not layouts or any(lay is None for lay in layouts):
        return None
    nd = len(layouts[0].dims)
    d = dim % nd
    if any(len(lay.dims) != nd or lay.dims[:d] + lay.dims[d + 1:] != layouts[0].dims[:d] + layouts[0].dims[d + 1:]
           for lay in layouts):
        return None
    total = sum(int(s[d]) for s in shapes)
    parts = [lay.dims[d] for lay in layouts]
    lost = frozenset.intersection(*(lay.lost for lay in layouts))
    if all(_is_pixel(p) and (p[0].kind, p[0].grid) == (parts[0][0].kind, parts[0][0].grid) for p in parts):
        joined: tuple[Factor, ...] = (Factor(parts[0][0].kind, total, parts[0][0].grid),)
    elif all(p == () for p in parts) and _regained(layouts) is not None and total > 1:
        kind, grid = _regained(layouts)
        joined, lost = (Factor(kind, total, grid),), lost - {(kind, grid)}
    else:
        joined = _other(total)
    dims = list(layouts[0].dims)
    dims[d] = joined
    return Layout(tuple(dims), lost)


def stack(layouts: Sequence[Layout | None], dim: int) -> Layout | None:
    """torch.stack: a new dim of the parts; a pixel dim when the parts are the rows (or columns) that
    indexing took away from one map."""
    if not layouts or any(lay is None for lay in layouts) or any(lay.dims != layouts[0].dims for lay in layouts):
        return None
    k = len(layouts)
    d = dim % (len(layouts[0].dims) + 1)
    axis = _regained(layouts)
    lost = frozenset.intersection(*(lay.lost for lay in layouts))
    if axis is not None and k > 1:
        new, lost = (Factor(axis[0], k, axis[1]),), lost - {axis}
    else:
        new = _other(k)
    dims = list(layouts[0].dims)
    dims.insert(d, new)
    return Layout(tuple(dims), lost)


def broadcast(lay: Layout, in_shape: Sequence[int], out_shape: Sequence[int]) -> Layout | None:
    """An elementwise op's output laid out like the operand `lay` (shape `in_shape`) broadcast to `out_shape`."""
    pad = len(out_shape) - len(in_shape)
    if pad < 0:
        return None
    dims = [_other(int(s)) for s in out_shape[:pad]]
    for fs, a, b in zip(lay.dims, in_shape, out_shape[pad:]):
        if a == b:
            dims.append(fs)
        elif a == 1:
            dims.append(_other(int(b)))
        else:
            return None
    return Layout(tuple(dims), lay.lost)


def batch_first(lay: Layout | None, shape: Sequence[int]) -> bool:
    """Whether dim 0 of a tensor with this layout is the whole frame batch and nothing else (a pooled vector
    (N, C), a box decode's (N, 16, 4, anchors) bins): work on it is per image. False for an unknown layout
    and for a batch merged with another dim, as in (N * C, 1, H, W), or moved off dim 0."""
    return lay is not None and bool(shape) and bool(lay.dims) and lay.dims[0] == (Factor("n", int(shape[0])),)


def has_pixels(lay: Layout) -> bool:
    """Whether some elements of a tensor with this layout still sit at their own pixels: a row or column
    factor in a dim, or a pixel axis indexed away (the values of one row, one column)."""
    return bool(lay.lost) or any(f.kind in PIXEL for d in lay.dims for f in d)


def pixel_free(out_shape: Sequence[int]) -> Layout:
    """The output of an op whose inputs from the stream hold no pixel (pooled vectors, a head's logits):
    it holds none either, whatever the op mixes; its dims are unlabelled."""
    return Layout(tuple(_other(int(s)) for s in out_shape))


def per_image(batch: int, out_shape: Sequence[int]) -> Layout | None:
    """The output of an op applied to each image on its own (a Linear, a conv, a batched matmul): the batch
    stays dim 0; the other dims hold no pixel axis that the rules could follow."""
    if not out_shape or int(out_shape[0]) != batch:
        return None
    return Layout(((Factor("n", batch),),) + tuple(_other(int(s)) for s in out_shape[1:]))


def is_map(lay: Layout | None, shape: Sequence[int] | None) -> bool:
    """Whether a tensor with this layout is a feature map of the stream: 4-D, the whole batch first, its
    last two dims made of rows and columns of one grid only (in any order, sliced, or flattened into one
    of them), at least one of them larger than 1, and its channels (dim 1) holding no pixel axis, so
    that all values at one position come from one pixel. Not maps: a box decode's (b, 16, 4, anchors)
    bins, vectors viewed to (N, C, 1, 1), rows folded into channels (N, C * H, 1, W) for a sequence head."""
    if lay is None or shape is None or len(shape) != 4 or len(lay.dims) != 4:
        return False
    if lay.dims[0] != (Factor("n", int(shape[0])),) or any(f.kind in PIXEL for f in lay.dims[1]):
        return False
    pix = lay.dims[2] + lay.dims[3]
    return bool(pix) and all(f.kind in PIXEL for f in pix) and len({f.grid for f in pix}) == 1
