"""Seeded benchmark workloads as token ids (the shapes of shared/WORKLOADS.md).

Lengths in the table are the paper's divided by 4, so `len_scale=4` reproduces the table and
`len_scale=1` gives 4x longer requests. Every length is drawn at the paper's scale and then
divided by `len_scale`, so the shape (mixture weights, lognormal sigma, clip range) never
changes with the scale.

One `numpy.random.Generator` drives everything in a fixed order (lengths, then prompt ids,
then arrivals), so a seed gives the same prompts in offline and online mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# Ids below this are left out of prompts: SmolLM2's special tokens are 0..16 and the tiny
# models' are 0..2, so random prompts never contain a BOS/EOS/chat marker.
DEFAULT_MIN_TOKEN_ID = 32
TABLE_LEN_SCALE = 4  # the table in WORKLOADS.md is the paper's lengths divided by this

Mode = Literal["offline", "online"]


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload; the same list goes to every policy and peer of a run."""

    prompt_token_ids: list[int]  # ids in [min_token_id, vocab_size)
    max_tokens: int  # output length to generate (ignore_eos: exactly this many)
    arrival_s: float  # seconds after the run starts; 0.0 for every request offline


@dataclass(frozen=True)
class Uniform:
    """Integer U[lo, hi] (both inclusive), bounds at the paper's scale."""

    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, n: int, factor: float) -> np.ndarray:
        lo, hi = _scaled(self.lo, factor), _scaled(self.hi, factor)
        return rng.integers(lo, max(lo, hi) + 1, size=n)


@dataclass(frozen=True)
class LogNormal:
    """Lognormal with the given median and sigma, rounded and clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, n: int, factor: float) -> np.ndarray:
        x = rng.lognormal(np.log(self.median * factor), self.sigma, size=n)
        lo, hi = _scaled(self.lo, factor), _scaled(self.hi, factor)
        return np.clip(np.rint(x), lo, max(lo, hi)).astype(np.int64)


@dataclass(frozen=True)
class Mixture:
    """Pick one component per request with the given weights (they sum to 1)."""

    weights: tuple[float, ...]
    parts: tuple[Uniform | LogNormal, ...]

    def sample(self, rng: np.random.Generator, n: int, factor: float) -> np.ndarray:
        which = rng.choice(len(self.parts), size=n, p=np.asarray(self.weights))
        out = np.empty(n, dtype=np.int64)
        for i, part in enumerate(self.parts):
            idx = np.flatnonzero(which == i)
            out[idx] = part.sample(rng, len(idx), factor)
        return out


Dist = Uniform | LogNormal | Mixture


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt: Dist  # prompt length distribution, paper scale (tokens)
    output: Dist  # output length distribution, paper scale (tokens)
    source: str  # where the shape comes from


def _paper(x: float) -> int:
    """Table length (already /4) -> paper length."""
    return round(x * TABLE_LEN_SCALE)


def _scaled(x: int, factor: float) -> int:
    return max(1, round(x * factor))


_SHORT = Uniform(_paper(16), _paper(255))
_LONG = Uniform(_paper(256), _paper(2047))
_MIX_OUT = Uniform(_paper(16), _paper(128))

WORKLOADS: dict[str, WorkloadSpec] = {
    "mix95": WorkloadSpec(
        "mix95", Mixture((0.95, 0.05), (_SHORT, _LONG)), _MIX_OUT, "paper synthetic, 95% short"
    ),
    "mix70": WorkloadSpec(
        "mix70", Mixture((0.70, 0.30), (_SHORT, _LONG)), _MIX_OUT, "paper synthetic, 70% short"
    ),
    "sharegpt": WorkloadSpec(
        "sharegpt",
        LogNormal(_paper(120), 1.0, _paper(4), _paper(2048)),
        LogNormal(_paper(100), 0.8, _paper(4), _paper(512)),
        "ShareGPT-style chat",
    ),
    "longbench": WorkloadSpec(
        "longbench", Uniform(_paper(1024), _paper(4095)), _MIX_OUT, "LongBench-style long context"
    ),
    "azure-conv": WorkloadSpec(
        "azure-conv",
        LogNormal(_paper(255), 0.7, _paper(8), _paper(2048)),
        LogNormal(_paper(64), 0.6, _paper(4), _paper(256)),
        "Azure LLM inference trace (conversation)",
    ),
}
WORKLOAD_NAMES: tuple[str, ...] = tuple(WORKLOADS)


def get_spec(name: str) -> WorkloadSpec:
    spec = WORKLOADS.get(name)
    if spec is None:
        raise ValueError(f"unknown workload {name!r}; expected one of {list(WORKLOAD_NAMES)}")
    return spec


def make_workload(
    name: str,
    num_requests: int,
    vocab_size: int,
    seed: int = 0,
    len_scale: float = TABLE_LEN_SCALE,
    mode: Mode = "offline",
    rate: float | None = None,
    burstiness: float = 1.0,
    max_model_len: int | None = None,
    min_token_id: int = DEFAULT_MIN_TOKEN_ID,
) -> list[WorkloadRequest]:
    """Generate `num_requests` requests of workload `name`.

    online mode: inter-arrival gaps are Gamma(shape=burstiness, mean=1/rate) seconds;
    burstiness 1 is Poisson, below 1 burstier, above 1 more regular.
    max_model_len: each request is clipped so prompt + output <= max_model_len; the output
    is kept (up to max_model_len - 1) and the prompt is cut first, since the output length
    is what decode throughput measures.
    """
    spec = get_spec(name)
    _validate(num_requests, vocab_size, len_scale, mode, rate, burstiness, max_model_len)
    low = min(min_token_id, vocab_size - 1)
    rng = np.random.default_rng(seed)
    factor = 1.0 / len_scale
    prompt_lens = spec.prompt.sample(rng, num_requests, factor)
    output_lens = spec.output.sample(rng, num_requests, factor)
    if max_model_len is not None:
        output_lens = np.minimum(output_lens, max_model_len - 1)
        prompt_lens = np.minimum(prompt_lens, max_model_len - output_lens)
    prompts = [rng.integers(low, vocab_size, size=int(n)).tolist() for n in prompt_lens]
    arrivals = np.zeros(num_requests)
    if mode == "online":
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=num_requests)
        arrivals = np.cumsum(gaps)
    return [
        WorkloadRequest(p, int(o), float(a))
        for p, o, a in zip(prompts, output_lens, arrivals, strict=True)
    ]


def _validate(
    num_requests: int,
    vocab_size: int,
    len_scale: float,
    mode: str,
    rate: float | None,
    burstiness: float,
    max_model_len: int | None,
) -> None:
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if len_scale <= 0:
        raise ValueError(f"len_scale must be > 0, got {len_scale}")
    if mode not in ("offline", "online"):
        raise ValueError(f"mode must be 'offline' or 'online', got {mode!r}")
    if mode == "online" and (rate is None or rate <= 0):
        raise ValueError("online mode needs rate > 0 (requests per second)")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if max_model_len is not None and max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
