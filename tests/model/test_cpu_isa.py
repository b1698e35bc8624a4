"""oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) steers the engine's CPU kernel choices as the CPU's flags do."""

import pytest
import torch

from model import cpu_isa
from model.packed import can_pack_int8, int8_source_engine
from model.quantize import native_bfloat16

CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@pytest.fixture(autouse=True)
def uncapped(monkeypatch):
    for name in CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_uncapped_choices_follow_the_cpu_flags():
    has_bfloat16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bfloat16() == has_bfloat16
    assert cpu_isa.onednn_vnni() == torch.cpu._is_vnni_supported()


@pytest.mark.parametrize("variable", CAP_VARIABLES)
@pytest.mark.parametrize("cap", ["AVX2", "avx2", "AVX512_CORE"])
def test_a_cap_below_vnni_makes_the_choices_of_a_cpu_without_it(monkeypatch, variable, cap):
    monkeypatch.setenv(variable, cap)
    assert cpu_isa.onednn_isa_cap() == cap.upper()
    assert not native_bfloat16()  # `wo` stays float32: oneDNN would convert bfloat16 on the fly
    assert not cpu_isa.onednn_vnni() and not can_pack_int8() and int8_source_engine() is None


def test_a_cap_at_vnni_keeps_vnni_but_not_bfloat16(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert cpu_isa.onednn_vnni() == torch.cpu._is_vnni_supported()
    assert not native_bfloat16()


@pytest.mark.parametrize("value", ["ALL", "DEFAULT", "no-such-isa", ""])
def test_values_that_leave_onednn_uncapped_leave_the_choices_to_the_flags(monkeypatch, value):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
    assert cpu_isa.onednn_isa_cap() is None
    assert cpu_isa.onednn_vnni() == torch.cpu._is_vnni_supported()
    assert native_bfloat16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
