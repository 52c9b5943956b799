"""The engine's C++ kernels (`engine/csrc/`), compiled once per machine with torch's
extension builder and cached.

`make install` builds them (`python -m alignedserve.engine.native`); a process that finds no
cached build compiles it on first use (about a minute). Where no compiler is available the
engine falls back to its pure-torch paths, logging why once.

The build is tuned for the CPU it runs on (`-march=native`), so the cache key includes the
CPU's model and feature flags: a cache copied to another machine is rebuilt, not reused.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from alignedserve.engine.cpuinfo import cpu_flags, cpu_model

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "csrc" / n
           for n in ("paged_attention.cpp", "paged_prefill.cpp", "fused_ops.cpp")]
# -fopenmp: at::parallel_for runs on OpenMP; the module links libgomp.so.1, which resolves to
# the copy torch has already loaded (same soname), so torch and the kernels share one pool.
# -ffast-math lets the reductions and exp vectorize; finite-math stays off (-inf is used).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]


def _cpu_key() -> str:
    """A short hash of this CPU's model name and feature flags."""
    text = cpu_model() + "\n" + " ".join(sorted(cpu_flags()))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build_dir() -> Path:
    """$ALIGNEDSERVE_EXT_DIR, else ~/.cache/alignedserve/ext, one folder per torch + CPU."""
    import torch

    root = os.environ.get("ALIGNEDSERVE_EXT_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "alignedserve" / "ext"
    return base / f"torch{torch.__version__.replace('+', '-')}-{_cpu_key()}"


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled module, or None (with one warning) when it cannot be built here."""
    if os.environ.get("ALIGNEDSERVE_NO_NATIVE") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        # torch runs `ninja`; it sits beside this interpreter in a venv that is not activated.
        bindir = str(Path(sys.executable).parent)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        # torch's own build lock is a plain file: a build killed midway leaves it behind and
        # every later process waits on it forever. An flock is released by the OS however
        # its holder ends, so while we hold ours, a torch lock still present is stale.
        with open(out / "alignedserve.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            stale = out / "lock"
            if stale.exists():
                log.warning("removing %s, left by a kernel build that was killed", stale)
                stale.unlink()
            return load(name="alignedserve_kernels", sources=[str(s) for s in SOURCES],
                        extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                        build_directory=str(out), verbose=False)
    except Exception as exc:
        log.warning("C++ kernels unavailable, using the torch attention paths: %s", exc)
        return None


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    mod = kernels()
    if mod is None:
        raise SystemExit("building the C++ kernels failed (see the warning above)")
    print(f"C++ kernels ready in {build_dir()} ({time.perf_counter() - t0:.0f} s)")
