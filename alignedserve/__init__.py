"""AlignedServe: high-throughput LLM serving with prefix-aware (KV-length aligned) batching.

Public API: `LLM`, `SamplingParams`, `EngineConfig`, `RequestOutput`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from alignedserve.engine.config import EngineConfig
    from alignedserve.engine.llm_engine import RequestOutput
    from alignedserve.llm import LLM
    from alignedserve.scheduling.sampling_params import SamplingParams


def __getattr__(name: str):
    # Lazy: `import alignedserve.scheduling` must not pull in torch.
    if name == "LLM":
        from alignedserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from alignedserve.scheduling.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from alignedserve.engine.config import EngineConfig

        return EngineConfig
    if name == "RequestOutput":
        from alignedserve.engine.llm_engine import RequestOutput

        return RequestOutput
    raise AttributeError(name)
