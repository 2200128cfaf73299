"""Without its compiled kernels the CPU backend falls back to the pure-PyTorch reference, loudly
when the build fails and quietly when the user opted out."""
from __future__ import annotations

import pytest
import torch
from torch.utils import cpp_extension

from deltacnn.backends import cpu_kernels, get_backend
from deltacnn.backends.reference import ReferenceBackend


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget any earlier load() result for the duration of a test."""
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_error", None)


def test_opt_out_uses_reference(fresh_loader, monkeypatch) -> None:
    monkeypatch.setenv("DELTACNN_NO_CPU_KERNELS", "1")
    assert type(get_backend(torch.device("cpu"))) is ReferenceBackend
    assert "DELTACNN_NO_CPU_KERNELS" in cpu_kernels.load_error()


def test_failed_build_warns_and_uses_reference(fresh_loader, monkeypatch) -> None:
    monkeypatch.delenv("DELTACNN_NO_CPU_KERNELS", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'deltacnn_cpu_kernels'")
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
        backend = get_backend(torch.device("cpu"))
    assert type(backend) is ReferenceBackend
    assert "Error building extension" in cpu_kernels.load_error()
