"""`LLM`: offline batched generation in this process (the vLLM `LLM` shape)."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from alignedserve.engine.config import EngineConfig
from alignedserve.engine.llm_engine import LLMEngine, RequestOutput
from alignedserve.scheduling.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate from a model folder in-process.

    >>> llm = LLM("/path/to/model", policy="fcfs")
    >>> out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))
    """

    def __init__(self, model: str, policy: str = "fcfs", **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), policy=policy, **engine_kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run all prompts to completion; outputs come back in prompt order."""
        batch = _as_batch(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(params)} SamplingParams")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(batch, params, strict=True)]
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step().finished:
                    results[out.request_id] = out
                    bar.update(1)
        return [results[i] for i in ids]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, or a list of token ids) or a sequence of them, as a list."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [list(prompts) if isinstance(prompts, list) else str(prompts)]
    batch: list[Prompt] = []
    for p in prompts:
        if not isinstance(p, str | list):
            raise TypeError(f"a prompt is text or a list of token ids, not {type(p).__name__}")
        batch.append(p)
    return batch
