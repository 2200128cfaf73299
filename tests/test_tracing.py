"""The shape-aware tracer: shape-derived arguments become literals, tuple proxies iterate, errors name the line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltacnn
from deltacnn.tracing import trace


class ShapeArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x, *args, **kwargs):
        y = self.conv(x)
        a, b = y.chunk(2, 1)  # unpacking
        parts = list(y.chunk(2, 1))  # iteration (Ultralytics C2f)
        half = x[:, : x.shape[1] // 2]
        up = F.interpolate(self.down(a), size=x.shape[-2:])
        return torch.cat([a + up, b, parts[1], half], 1) * (len(x) + x.size(1) + x.dim())


def test_shape_queries_become_literals_and_outputs_match():
    x = torch.randn(2, 4, 8, 8)
    m = ShapeArgs().eval()
    gm = trace(m, x)
    code = gm.code
    assert "size = (8, 8)" in code and "slice(None, 2, None)" in code
    assert ".size(" not in code and "getattr" not in code  # no shape query left in the graph
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))


def test_data_dependent_branch_names_node_and_source_line():
    class Branchy(nn.Module):
        def forward(self, x):
            s = x.mean()
            if s > 0:  # the line the error must point at
                return x
            return -x

    with pytest.raises(deltacnn.ConversionError) as e:
        deltacnn.convert(Branchy(), torch.randn(1, 3, 8, 8))
    msg = str(e.value)
    assert "could not trace" in msg and "'gt'" in msg and "test_tracing.py" in msg
    assert "if s > 0:" in msg and "torch.fx.wrap" in msg and "leaf_modules" in msg


def test_leaf_module_becomes_a_dense_island():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.gate, self.out = nn.Conv2d(3, 4, 3, padding=1), Gate(), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.out(self.gate(self.conv(x)))

    m = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(deltacnn.UnsupportedOperationError, match="gate"):
        deltacnn.convert(m, x, leaf_modules=[Gate])
    dm = deltacnn.convert(m, x, leaf_modules=["gate"], allow_dense_fallback=True, backend="reference")
    for t in range(3):
        xt = x + 0.1 * t
        with torch.no_grad():
            assert torch.allclose(dm(xt), m(xt), atol=1e-5)
