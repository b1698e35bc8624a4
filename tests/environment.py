"""What a test run ran on: the CPU and its SIMD flags, and the versions of the packages the results depend on.

    python -m tests.environment                          # print it
    python -m tests.environment --torch 'torch==2.13.0' --cpu-only   # and fail unless that torch is installed

pytest prints the same lines in its header (tests/conftest.py), so every log names its machine. The check
exists because an unpinned install once replaced the CPU torch it had just installed with a CUDA build
(issue 11): the tests then tested another torch than the one asked for, and pulled gigabytes.
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata

# The flags that decide which kernels torch, oneDNN and bitsandbytes pick on x86-64.
SIMD_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
PACKAGES = (
    "torch",
    "transformers",
    "bitsandbytes",
    "ray",
    "pyarrow",
    "sentencepiece",
    "safetensors",
    "fsspec",
    "peft",
    "accelerate",
    "numpy",
    "moto",
    "s3fs",
)


def cpu() -> tuple[str, list[str]]:
    """(model name, the SIMD_FLAGS this CPU has), read from /proc/cpuinfo; the platform's name elsewhere."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [flag for flag in SIMD_FLAGS if flag in flags]


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def describe() -> list[str]:
    model, flags = cpu()
    import torch

    from model.cpu_isa import isa_caps

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return [
        f"cpu: {model}; simd: {' '.join(flags) or 'none of ' + ', '.join(SIMD_FLAGS)}",
        f"python {platform.python_version()}; torch {torch.__version__} ({build}), "
        f"{torch.get_num_threads()} threads, ATen CPU kernels {torch.backends.cpu.get_cpu_capability()}"
        + (f", ISA caps {isa_caps()}" if isa_caps() else ""),
        "packages: " + ", ".join(f"{name} {version}" for name, version in versions().items()),
    ]


def check_torch(requirement: str, cpu_only: bool) -> str | None:
    """None when the installed torch satisfies `requirement` (a pip requirement such as 'torch==2.13.0'), and
    is a CPU build where `cpu_only`; otherwise what is wrong."""
    import torch
    from packaging.requirements import Requirement

    wanted = Requirement(requirement)
    installed = torch.__version__
    if wanted.name != "torch":
        return f"{requirement!r} does not name torch"
    # Without a local label in the specifier, '==2.13.0' matches 2.13.0+cpu and 2.13.0+cu130 alike (PEP 440).
    if not wanted.specifier.contains(installed, prereleases=True):
        return f"torch {installed} is installed, but {requirement!r} was asked for: the install replaced it"
    if cpu_only and torch.version.cuda:
        return f"torch {installed} is a CUDA {torch.version.cuda} build, where the CPU build was asked for"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", help="fail unless the installed torch satisfies this requirement")
    parser.add_argument("--cpu-only", action="store_true", help="fail if the installed torch is a CUDA build")
    args = parser.parse_args(argv)
    print("\n".join(describe()))
    if args.torch:
        problem = check_torch(args.torch, args.cpu_only)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
