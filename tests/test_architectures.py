"""Every architecture of the zoo converts unmodified and matches dense PyTorch over 200 frames at tau = 0."""
from __future__ import annotations

import pytest
import torch

import deltacnn
from conftest import ZOO_SMALL, make_video, rel_err, small_zoo_model

FRAMES = 200

CONFIGS = ZOO_SMALL
build = small_zoo_model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tau0_float32_matches_dense_over_200_frames(name):
    m = build(name)
    clip = make_video(FRAMES, h=32, w=32, noise=0.01, seed=11)
    # dispatch off: the noise changes every pixel, and busy frames would otherwise run densely
    # (exact, but then this would not test the delta path)
    dm = deltacnn.convert(m, clip[0], dense_above=None)
    worst = 0.0
    for t in range(FRAMES):
        with torch.no_grad():
            want = m(clip[t])
        worst = max(worst, rel_err(dm(clip[t]), want))
    assert worst < 1e-4, f"{name}: worst relative error {worst:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tau0_bfloat16_with_float32_accumulators(name):
    """bf16 compute: delta output stays as close to the float32 truth as dense bf16 inference is."""
    m = build(name)
    clip = make_video(FRAMES, h=32, w=32, noise=0.01, seed=12)
    dm = deltacnn.convert(m, clip[0], dtype=torch.bfloat16, dense_above=None)  # delta frames only
    m16 = build(name).to(torch.bfloat16)
    worst_delta, worst_dense = 0.0, 0.0
    for t in range(FRAMES):
        with torch.no_grad():
            truth = m(clip[t])
            dense16 = m16(clip[t].bfloat16())
        worst_delta = max(worst_delta, rel_err(dm(clip[t]), truth))
        worst_dense = max(worst_dense, rel_err(dense16, truth))
    # rounding of linear outputs is not re-sent later, so the reference keeps them float32: no drift
    assert worst_delta < 2 * worst_dense + 1e-3, f"{name}: delta {worst_delta:.2e} vs dense bf16 {worst_dense:.2e}"


def test_squeeze_excitation_is_a_stream_product():
    dm = deltacnn.convert(build("mobilenet_v3_small"), make_video(1, h=32, w=32)[0])
    kinds = [type(layer).__name__ for layer in dm.layers.values()]
    assert "DeltaMul" in kinds and "DeltaGlobalAvgPool" in kinds


def test_unet_uses_concat_and_upsampling():
    dm = deltacnn.convert(build("unet"), make_video(1, h=32, w=32)[0])
    kinds = [type(layer).__name__ for layer in dm.layers.values()]
    assert "DeltaCat" in kinds and "DeltaLinearMap" in kinds
