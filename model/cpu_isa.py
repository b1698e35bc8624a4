"""Which instructions oneDNN will run our CPU kernels with: the CPU's flags, capped where its environment caps them.

torch.cpu's checks (_is_vnni_supported and friends) read the CPU's flags. oneDNN can be held below them with
ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA), as one does to reproduce an older CPU's behaviour, e.g.
the AVX2-only EPYCs, on an AVX-512 machine. A choice made on the flags alone then goes wrong: `wo` held in bfloat16
for an oneDNN that converts bfloat16 on the fly (4x slower than float32), an int8 head packed for a VNNI kernel
that oneDNN no longer runs. So the engine's kernel choices ask here, and make on a capped machine the choices they
make on a CPU that has only what the cap allows.
"""

from __future__ import annotations

import os

import torch

# The variables that hold each library that picks its CPU kernels at run time below what the CPU has: torch's own
# kernels, oneDNN, fbgemm (torch's int8-dynamic linears), MKL, CTranslate2. Set together at AVX2, they run an AVX-512
# machine as an AVX2 one (benchmarks/README.md, "AVX2 on an AVX-512 machine"); the benchmarks and the tests' header
# record those set.
ISA_CAP_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "FBGEMM_ENABLE_INSTRUCTIONS",
    "MKL_ENABLE_INSTRUCTIONS",
    "CT2_FORCE_CPU_ISA",
)


def isa_caps() -> str:
    """The ISA caps set, as the start of a command line that sets them again ('' when none is)."""
    return " ".join(f"{name}={os.environ[name]}" for name in ISA_CAP_VARIABLES if os.environ.get(name))


# oneDNN's ISA names in its order, each containing the ones before (aliases of one level share its rank). An
# unknown value leaves oneDNN uncapped, and here too.
_ONEDNN_ISA_RANKS = {
    "SSE41": 0,
    "AVX": 1,
    "AVX2": 2,
    "AVX2_VNNI": 3,
    "AVX2_VNNI_2": 4,
    "AVX512_CORE": 5,
    "AVX512_CORE_VNNI": 6,
    "AVX512_CORE_BF16": 7,
    "AVX10_1_512": 8,
    "AVX512_CORE_FP16": 8,
    "AVX10_1_512_AMX": 9,
    "AVX512_CORE_AMX": 9,
    "AVX10_1_512_AMX_FP16": 10,
    "AVX512_CORE_AMX_FP16": 10,
}


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is capped at by the environment, upper-cased; None when uncapped (unset, ALL, DEFAULT)."""
    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return value if value in _ONEDNN_ISA_RANKS else None


def _onednn_allows(isa: str) -> bool:
    cap = onednn_isa_cap()
    return cap is None or _ONEDNN_ISA_RANKS[cap] >= _ONEDNN_ISA_RANKS[isa]


def onednn_vnni() -> bool:
    """Whether oneDNN multiplies u8 x s8 with AVX-512 VNNI (or AMX): the CPU has it and no cap forbids it."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return is_vnni is not None and is_vnni() and _onednn_allows("AVX512_CORE_VNNI")


def onednn_bfloat16() -> bool:
    """Whether oneDNN multiplies bfloat16 in hardware: AVX512_BF16, or AMX tiles, that the CPU has and no cap
    forbids."""
    return (torch.cpu._is_avx512_bf16_supported() and _onednn_allows("AVX512_CORE_BF16")) or (
        torch.cpu._is_amx_tile_supported() and _onednn_allows("AVX512_CORE_AMX")
    )
