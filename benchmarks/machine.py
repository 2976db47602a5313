"""The machine the benchmark numbers belong to: the CPU's model name and the instruction sets that decide its
matmul speed (native bf16 — ``avx512_bf16``, ``amx_bf16`` — makes bf16 autocast worth it; ``avx512f`` / ``avx2``
set the fp32 GEMM width)."""

from __future__ import annotations

import platform
from pathlib import Path

FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of ``/proc/cpuinfo`` (None where there is no such file or field)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> dict[str, bool | None]:
    """Whether the CPU has each of :data:`FLAGS` (None for all where ``/proc/cpuinfo`` lists no flags)."""
    flags = _cpuinfo_field("flags")
    present = set(flags.split()) if flags is not None else None
    return {flag: None if present is None else flag in present for flag in FLAGS}


def describe_cpu(flags: dict[str, bool | None]) -> str:
    """``avx512_bf16 yes, amx_bf16 no, avx512f yes, avx2 yes`` (results older than the flags: none recorded)."""
    if not flags:
        return "CPU flags not recorded"
    return ", ".join(f"{flag} {'?' if has is None else 'yes' if has else 'no'}" for flag, has in flags.items())
