"""Token sampling: greedy, temperature, top-k, top-p, min-p; per-request seeded RNG.

Each request owns a torch.Generator, so a seeded request draws the same tokens whatever
else shares its batch. Sampling uses the exponential race (argmax of p / Exp(1) noise),
which equals a categorical draw from p and needs no normalization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignedserve.scheduling.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]  # one per row
    logprobs: list[float] | None  # raw model log-probability of each sampled token


def filter_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p. logits: [N, vocab] fp32."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    x = logits / temps[:, None]
    vocab = x.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in ks):
        kth = torch.topk(x, max(ks), dim=-1).values.gather(1, torch.tensor(ks)[:, None] - 1)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    top_ps = torch.tensor([p.top_p for p in params], dtype=probs.dtype)
    if bool((top_ps < 1.0).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        drop_sorted = mass_before >= top_ps[:, None]  # the top token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype)
    if bool((min_ps > 0).any()):
        floor = min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> SampleResult:
    """logits: [N, vocab] fp32, one row per request; generators: one per row."""
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        probs = filter_probs(logits[random_rows], [params[i] for i in random_rows])
        for j, i in enumerate(random_rows):
            noise = torch.empty_like(probs[j]).exponential_(generator=generators[i])
            tokens[i] = (probs[j] / noise).argmax()
    logprobs = None
    if any(p.logprobs for p in params):
        lp = torch.log_softmax(logits, dim=-1)
        logprobs = lp.gather(1, tokens[:, None])[:, 0].tolist()
    return SampleResult(tokens.tolist(), logprobs)
