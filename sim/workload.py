"""Workloads for the simulator: lengths and arrival times only, as numpy arrays.

The simulator never looks at token ids, so it draws the same length distributions as
`loadgen.workloads` (the very `WorkloadSpec` objects) without materialising a million
prompts: 1M requests cost 24 MB here instead of gigabytes of Python ints. Requests are
built per pair, just before that pair is simulated.

Draw order (one `numpy.random.Generator`): prompt lengths, output lengths, arrival gaps.
It differs from `make_workload` (which also draws prompt ids in between), so a seed gives
the same distribution but not the same requests as the engine benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignedserve.loadgen.workloads import get_spec
from alignedserve.scheduling.request import Request
from alignedserve.scheduling.sampling_params import SamplingParams

TOKEN = 1  # every prompt position and every sampled token; only lengths matter here


@dataclass(frozen=True)
class SimWorkload:
    """Request k has `prompt[k]` prompt tokens, generates exactly `output[k]` tokens and
    arrives at `arrival[k]` seconds (sorted ascending; all 0 offline)."""

    name: str
    prompt: np.ndarray  # [n] int64 tokens
    output: np.ndarray  # [n] int64 tokens
    arrival: np.ndarray  # [n] float64 seconds

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def output_tokens(self) -> int:
        return int(self.output.sum())

    def shard(self, pair: int, pairs: int) -> SimWorkload:
        """Round-robin routing in arrival order: pair p gets requests p, p + pairs, ..."""
        sl = slice(pair, None, pairs)
        return SimWorkload(self.name, self.prompt[sl], self.output[sl], self.arrival[sl])


def sim_workload(name: str, num_requests: int, seed: int = 0, len_scale: float = 1.0,
                 rate: float | None = None, burstiness: float = 1.0) -> SimWorkload:
    """`num_requests` of workload `name` at `len_scale` (1 = the paper's lengths); offline
    (all at t=0) when `rate` is None, else Gamma inter-arrivals with mean 1/rate s."""
    if num_requests < 1 or len_scale <= 0 or burstiness <= 0:
        raise ValueError("need num_requests >= 1, len_scale > 0 and burstiness > 0")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    spec = get_spec(name)
    rng = np.random.default_rng(seed)
    prompt = spec.prompt.sample(rng, num_requests, 1.0 / len_scale).astype(np.int64)
    output = np.maximum(1, spec.output.sample(rng, num_requests, 1.0 / len_scale))
    arrival = np.zeros(num_requests)
    if rate is not None:
        arrival = np.cumsum(rng.gamma(burstiness, 1.0 / (rate * burstiness), num_requests))
    return SimWorkload(name, prompt, output.astype(np.int64), arrival)


def make_request(k: int, prompt_len: int, output_len: int, arrival_s: float) -> Request:
    """Request `r{k}`; it runs to exactly `output_len` tokens (ignore_eos)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    return Request(f"r{k}", [TOKEN] * prompt_len, params, frozenset(), arrival_time=arrival_s)
