"""This CPU's model name and feature flags, from Linux's /proc/cpuinfo, read once.

The engine picks its default dtype by the flags (`config.preferred_dtype`) and keys its
kernel builds by both (`native.build_dir`); benchmarks record them beside their results.
Elsewhere the flags are empty and the model is the platform's processor string.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _fields() -> dict[str, str]:
    """The first CPU's "model name" and "flags" lines."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            key = key.strip()
            if sep and key in ("model name", "flags"):
                out.setdefault(key, value.strip())
            if len(out) == 2:
                break
    except OSError:
        pass
    return out


def cpu_model() -> str:
    return _fields().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """Feature flags (avx2, avx512_bf16, amx_bf16, ...); empty where unknown."""
    return frozenset(_fields().get("flags", "").split())
