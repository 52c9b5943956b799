"""The fault suite's load: greedy streams from client threads, as a well-behaved client
sends them (`tests/test_chaos.py`)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

N_TOKENS = 40


@dataclass
class Stream:
    prompt: str
    rid: str = ""
    text: str = ""
    chunk_times: list[float] = field(default_factory=list)
    error: str | None = None
    finish: str | None = None


def run_stream(base: str, s: Stream) -> Stream:
    """One streaming request, as a well-behaved client sends it: a 429 is retried after
    its Retry-After (24 streams exceed the admission queue of 16 when they arrive at once)."""
    for _ in range(30):
        if _try_stream(base, s) != 429:
            break
    return s


def _try_stream(base: str, s: Stream) -> int:
    body = {"model": "tiny", "prompt": s.prompt, "max_tokens": N_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=90) as resp:
            if resp.status_code == 429:
                time.sleep(float(resp.headers["retry-after"]))
                return 429
            if resp.status_code != 200:
                s.error = f"HTTP {resp.status_code}: {resp.read().decode()}"
                return resp.status_code
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    s.error = msg["error"]["message"]
                    continue
                s.rid = msg["id"]
                s.text += msg["choices"][0]["text"]
                s.chunk_times.append(time.monotonic())
                s.finish = msg["choices"][0]["finish_reason"] or s.finish
    except httpx.HTTPError as e:
        s.error = f"{type(e).__name__}: {e}"
    return 200


class Load:
    """The 24 prompts (or some) streaming concurrently in threads."""

    def __init__(self, base: str, prompts: list[str]) -> None:
        self.streams = [Stream(p) for p in prompts]
        self.pool = ThreadPoolExecutor(len(prompts))
        self.futures = [self.pool.submit(run_stream, base, s) for s in self.streams]

    def wait_streaming(self, min_chunks: int = 3, timeout_s: float = 60) -> None:
        """Until most streams have tokens: the requests are held by replicas now."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(len(s.chunk_times) >= min_chunks for s in self.streams) >= \
                    0.75 * len(self.streams):
                return
            time.sleep(0.05)
        raise TimeoutError("the load did not start streaming")

    def finish(self, timeout_s: float = 150) -> list[Stream]:
        for f in self.futures:
            f.result(timeout=timeout_s)
        self.pool.shutdown()
        return self.streams
