"""The aligned policy's line-up: which pooled requests join the running batch next, and in
what order. A request's place follows its aging score (`window_search.aging_score`): its
distance from the batch's band of KV lengths, less the bands it has earned by waiting
(`max_wait_steps` engine steps per band)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from alignedserve.scheduling.aligned_config import AlignedConfig
from alignedserve.scheduling.request import Request
from alignedserve.scheduling.window_search import aging_score, band_distance

Band = tuple[int, int]  # (shortest, longest) KV length


def distance(length: int, band: Band, cfg: AlignedConfig) -> float:
    """How far a KV length lies outside `band`, in bands (0 inside), as `cfg` aligns."""
    return band_distance(length, *band, cfg.max_spread, cfg.slack_tokens, cfg.align_by,
                         cfg.split_above_tokens)


def line_up(pooled: Mapping[str, Request], entered: Mapping[str, int], steps: int,
            band: Band, cfg: AlignedConfig, limit: int, force: bool = False,
            among: Iterable[str] | None = None) -> list[Request]:
    """Up to `limit` pooled requests (of `among`, default all) with aging score <= 0 (any
    score if `force`), best first; ties shortest first (more members fit the device, and a
    burst is swept from short to long), then earlier in the pool. `entered`: the step each
    entered the pool; `steps`: the step now. Under align_by "total" length decides nothing:
    oldest first, then pool (arrival) order, as fcfs, which leaves no burst's long prompts
    for a thin tail."""
    by_length = cfg.align_by != "total"
    scored = []
    for k, rid in enumerate(pooled if among is None else among):
        r = pooled[rid]
        s = aging_score(distance(r.num_tokens, band, cfg), steps - entered[rid],
                        cfg.max_wait_steps)
        if s <= 0 or force:
            scored.append((s, r.num_tokens if by_length else 0, k, r))
    return [t[3] for t in heapq.nsmallest(limit, scored, key=lambda t: t[:3])]
