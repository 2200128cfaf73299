"""The model zoo: every model builds, runs, traces with torch.fx to an equivalent graph, and keeps torchvision names."""
from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from conftest import ZOO_SMALL, small_zoo_model
from deltacnn import models

SMALL = ZOO_SMALL
OUT_SHAPE = {"unet": (2, 2, 64, 64), "unet_transposed": (2, 2, 64, 64), "hrnet_like": (2, 5, 16, 16)}


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second intra-op thread only adds barrier waits (badly so on a loaded box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


small = small_zoo_model


def test_registry_lists_every_family():
    assert set(SMALL) - {"unet_transposed"} == set(models.MODELS)


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_and_fx_trace_agree(name):
    m = small(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = m(x)
        gm = torch.fx.symbolic_trace(m)
        got = gm(x)
    assert tuple(want.shape) == OUT_SHAPE.get(name, (2, 10))
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_randomize_bn_changes_every_bn_deterministically():
    a, b = small("resnet18"), small("resnet18")
    bns = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(float((bn.running_var - 1).abs().max()) > 0 and float(bn.running_mean.abs().max()) > 0
                       for bn in bns)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("name, keys", [
    ("resnet18", ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
                  "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "layer4.1.conv2.weight",
                  "fc.weight", "fc.bias"]),
    ("resnet50", ["layer1.0.conv3.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
                  "layer3.5.bn3.running_var", "layer4.2.conv3.weight", "fc.weight"]),
    ("mobilenet_v2", ["features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                      "features.2.conv.0.1.running_mean", "features.18.0.weight", "classifier.1.weight"]),
    ("mobilenet_v3_large", ["features.0.0.weight", "features.4.block.2.fc1.weight", "features.16.0.weight",
                            "classifier.0.weight", "classifier.3.weight"]),
    ("mobilenet_v3_small", ["features.1.block.1.fc2.bias", "features.12.0.weight", "classifier.3.bias"]),
])
def test_torchvision_state_dict_names(name, keys):
    sd = small(name).state_dict()
    missing = [k for k in keys if k not in sd]
    assert not missing, missing


def test_resnet_downsample_only_where_shapes_change():
    sd18, sd50 = small("resnet18").state_dict(), small("resnet50").state_dict()
    assert "layer1.0.downsample.0.weight" not in sd18  # 64 -> 64 at stride 1: plain identity
    assert "layer1.0.downsample.0.weight" in sd50  # 64 -> 256 needs a projection
    assert "layer1.1.downsample.0.weight" not in sd50


@pytest.mark.parametrize("name, params", [("resnet18", 11_689_512), ("resnet50", 25_557_032),
                                          ("mobilenet_v2", 3_504_872), ("mobilenet_v3_large", 5_483_032),
                                          ("mobilenet_v3_small", 2_542_856)])
def test_full_size_parameter_counts_match_torchvision(name, params):
    with torch.device("meta"):  # no memory, no init cost
        m = models.build(name)
    assert sum(p.numel() for p in m.parameters()) == params


def test_squeeze_excitation_scales_its_input():
    se = next(m for m in small("mobilenet_v3_small").modules() if type(m).__name__ == "SqueezeExcitation")
    x = torch.randn(1, se.fc1.in_channels, 5, 5)
    with torch.no_grad():
        s = se.scale_activation(se.fc2(se.activation(se.fc1(x.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(se(x), s * x)


def test_unknown_name_raises_with_valid_names():
    with pytest.raises(ValueError, match="resnet18") as e:
        models.build("resnet19")
    assert "resnet19" in str(e.value) and "hrnet_like" in str(e.value)
