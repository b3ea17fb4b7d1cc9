"""``mixed_precision: auto``: bf16 autocast only where the hardware computes bf16 natively."""

from __future__ import annotations

import warnings

import pytest
import torch
from rpsft.core import precision
from rpsft.core.config import TrainConfig


@pytest.fixture
def cpu_bf16(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)

    return set_native


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(cpu_bf16, native, expected):
    cpu_bf16(native)
    assert precision.resolve_mixed_precision("auto", "cpu") == expected


def test_explicit_settings_are_kept_and_emulated_bf16_warns(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(RuntimeWarning, match="emulated.*Fix: mixed_precision: auto"):
        assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"
        assert precision.resolve_mixed_precision("no", "cpu") == "no"
    with pytest.raises(ValueError, match="Fix: no, bf16, fp16 or auto"):
        precision.resolve_mixed_precision("bf32", "cpu")


def test_the_cpuinfo_fallback_reads_the_flags(monkeypatch, tmp_path):
    """Without oneDNN's query, the CPU flags decide (AVX512-BF16 or AMX)."""

    def no_query():
        raise AttributeError("no mkldnn op")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", no_query, raising=False)
    for flags, expected in (
        ("fpu avx2 avx512f", False),
        ("fpu avx512f avx512_bf16", True),
        ("amx_bf16", True),
    ):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(precision, "Path", lambda _path, info=info: info)
        precision.cpu_has_native_bf16.cache_clear()
        assert precision.cpu_has_native_bf16() is expected
    precision.cpu_has_native_bf16.cache_clear()


def test_the_training_arguments_follow_the_resolved_precision(cpu_bf16, tmp_path):
    from rpsft.core.train import training_arguments

    for native in (True, False):
        cpu_bf16(native)
        args = training_arguments(
            TrainConfig(mixed_precision="auto", output_dir=str(tmp_path)), progress=False
        )
        assert args.bf16 is native
    with pytest.raises(Exception, match="mixed_precision"):
        TrainConfig(mixed_precision="bf32")
