"""The in-process engine loop: scheduler + model runner + output tracking."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from alignedserve.engine.config import EngineConfig
from alignedserve.engine.kv_transfer import KVTransferQueue, TransferExecutor
from alignedserve.engine.model_runner import ModelRunner, StepStats
from alignedserve.engine.sizing import PoolSizes
from alignedserve.engine.tokenizer import (
    IncrementalDetokenizer,
    final_text,
    find_stop,
    load_tokenizer,
)
from alignedserve.kv_store.host_pool import HostKVPool
from alignedserve.scheduling.aligned import AlignedScheduler
from alignedserve.scheduling.aligned_config import AlignedConfig, AlignedKnobs
from alignedserve.scheduling.block_manager import KVBlockManager
from alignedserve.scheduling.fcfs import FCFSScheduler, SchedulerLimits
from alignedserve.scheduling.interface import Scheduler
from alignedserve.scheduling.request import FinishReason, Request
from alignedserve.scheduling.sampling_params import SamplingParams
from alignedserve.scheduling.swap import HostAllocator


@dataclass
class RequestOutput:
    """The result of one finished request. Times are `time.monotonic()` seconds."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids (including a stop token / the one ending a stop string)
    text: str  # detokenized output (cut before a matched stop string unless asked to keep it)
    finish_reason: str  # "stop" | "length" | "abort"
    arrival_time: float
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token
    logprobs: list[float] | None = None  # raw logprob per generated token, if requested
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(frozen=True)
class StepOutput:
    """What one `LLMEngine.step()` produced."""

    sampled: dict[str, int]  # request id -> token sampled this step (requests at their end)
    logprobs: dict[str, float]  # request id -> that token's logprob (requests that asked)
    finished: list[RequestOutput]  # requests that finished this step, in no set order


_NOTHING = StepOutput({}, {}, [])


@dataclass
class _Tracked:
    req: Request
    out: RequestOutput
    detok: IncrementalDetokenizer | None  # only for requests with stop strings


def aligned_config(cfg: EngineConfig, kernel_align_by: str) -> AlignedConfig:
    """The policy's config; `align_by` auto becomes what the decode kernel in use says."""
    knobs = {name: getattr(cfg, name) for name in AlignedKnobs.model_fields}
    if knobs["align_by"] == "auto":
        knobs["align_by"] = kernel_align_by
    return AlignedConfig(**{**knobs, "min_batch": min(cfg.min_batch, cfg.max_num_seqs)},
                         max_batch=cfg.max_num_seqs,
                         max_num_batched_tokens=cfg.max_num_batched_tokens)


def make_host_pool(sizes: PoolSizes) -> HostKVPool:
    return HostKVPool(sizes.host_blocks, sizes.block_shape, sizes.dtype)


def make_scheduler(cfg: EngineConfig, num_blocks: int, host: HostAllocator | None,
                   kernel_align_by: str) -> Scheduler:
    kv = KVBlockManager(num_blocks, cfg.block_size)
    if cfg.policy == "aligned":
        if host is None:
            raise ValueError("the aligned policy needs a host KV pool")
        return AlignedScheduler(kv, host, aligned_config(cfg, kernel_align_by))
    limits = SchedulerLimits(cfg.max_num_seqs, cfg.max_num_batched_tokens,
                             cfg.long_prefill_token_threshold)
    return FCFSScheduler(kv, limits)


@dataclass(frozen=True)
class EngineParts:
    """Pieces a compute replica supplies instead of the in-process defaults (all or none)."""

    kv_storage: Callable[[int], torch.Tensor]  # num_blocks -> the device pool's tensor
    host: HostAllocator  # host KV capacity (the node's KV store)
    transfers: TransferExecutor  # runs KVTransfers (the paired prefetch worker)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, record_stats: bool = False,
                 parts: EngineParts | None = None) -> None:
        self.cfg = cfg
        self.runner = ModelRunner(cfg, parts.kv_storage if parts else None)
        self.model_cfg = self.runner.model_cfg
        cache = self.runner.cache
        self.host_pool: HostKVPool | None = None
        self.transfers: TransferExecutor | None = None
        host: HostAllocator | None = None
        if parts is not None:
            host, self.transfers = parts.host, parts.transfers
        elif cfg.policy == "aligned":
            self.host_pool = make_host_pool(self.runner.sizes)
            host, self.transfers = self.host_pool.allocator, KVTransferQueue(cache, self.host_pool)
        self.scheduler = make_scheduler(cfg, cache.num_blocks, host, self.runner.align_by)
        try:
            self.tokenizer = load_tokenizer(cfg.model)
        except (OSError, ValueError):
            self.tokenizer = None  # token-id-only use (benchmarks) still works
        eos = set(self.model_cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.record_stats = record_stats
        self.stats: list[StepStats] = []
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer; pass token ids instead")
        return self.tokenizer.encode(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, arrived_at: float | None = None,
                    output_ids: Sequence[int] = ()) -> str:
        """Queue a new request; returns its id. `arrived_at` (time.time() seconds) is when
        it arrived upstream (the router), so TTFT and the policy's clocks count from there.
        `output_ids`: tokens it already generated elsewhere (a request resumed after its
        holder died); their KV is recomputed with the prompt's and generation continues
        after them, counting them against max_tokens. Raises ValueError for a prompt this
        engine cannot serve."""
        req = self._new_request(prompt, params, request_id, arrived_at)
        req.token_ids.extend(output_ids)
        self._track(req)
        self.scheduler.add_request(req)
        return req.request_id

    def add_prefilled(self, request_id: str, prompt: list[int], params: SamplingParams,
                      output_ids: list[int], host_blocks: list[int],
                      arrived_at: float | None = None) -> None:
        """Take over a request prefilled elsewhere: `output_ids` were already generated and
        the KV of every token but the last is in the host pool (`host_blocks`, position
        order). Needs the aligned policy (it swaps KV in from the host)."""
        if not output_ids:
            raise ValueError("a prefilled request has at least one output token")
        req = self._new_request(prompt, params, request_id, arrived_at)
        req.token_ids.extend(output_ids)
        req.num_computed_tokens = req.num_host_tokens = req.num_tokens - 1
        req.host_block_ids = list(host_blocks)
        self._track(req)
        self.scheduler.add_request(req)

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of these device KV blocks: [len(block_ids), *block_shape]."""
        return self.runner.cache.kv.index_select(0, torch.tensor(block_ids, dtype=torch.long))

    def _new_request(self, prompt: str | list[int], params: SamplingParams,
                     request_id: str | None, arrived_at: float | None) -> Request:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_cfg.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the limit is {self.max_model_len - 1} "
                f"(max_model_len {self.max_model_len})"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, ids, params, self.eos_token_ids, self.max_model_len)
        if arrived_at is not None:  # monotonic clock, counted back from the wall-clock age
            req.arrival_time = time.monotonic() - max(0.0, time.time() - arrived_at)
        return req

    def _track(self, req: Request) -> None:
        params = req.params
        detok = None
        if params.stop:
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            for t in req.output_token_ids:
                detok.push(t)
        out = RequestOutput(req.request_id, req.prompt_token_ids, [], "", "", req.arrival_time,
                            logprobs=[] if params.logprobs else None)
        self._tracked[req.request_id] = _Tracked(req, out, detok)

    def abort(self, request_id: str) -> RequestOutput | None:
        if self.scheduler.finish(request_id, FinishReason.ABORT) is None:
            return None
        return self._complete(self._tracked[request_id])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        """Requests this engine holds (waiting, pooled or running)."""
        return len(self._tracked)

    def get_request(self, request_id: str) -> Request | None:
        """The live request (read-only use: its token ids and device blocks)."""
        t = self._tracked.get(request_id)
        return t.req if t is not None else None

    def detach(self, request_id: str) -> None:
        """Stop tracking a live request and free its device KV: it continues elsewhere (a
        prefetch worker hands a prefilled request to the decode index this way)."""
        if self.scheduler.finish(request_id, FinishReason.ABORT) is not None:
            self.runner.release(request_id)
            del self._tracked[request_id]

    def step(self) -> StepOutput:
        """Run one scheduler step: the tokens it sampled and the requests it finished."""
        if self.transfers is not None:
            self.scheduler.transfers_done(self.transfers.poll())
        sched = self.scheduler.schedule()
        if self.transfers is not None:
            self.transfers.submit(sched.transfers)
            self.transfers.wait(sched.fence)
        if sched.empty:
            if self.transfers is not None and self.scheduler.has_unfinished():
                # Nothing runnable until copies land (device full of outgoing KV): wait.
                self.transfers.wait(self.transfers.submitted)
            return _NOTHING
        res = self.runner.execute(sched)
        if self.record_stats:
            self.stats.append(res.stats)
        now = time.monotonic()
        finished = {r.request_id for r in self.scheduler.update(sched, res.sampled)}
        done: list[RequestOutput] = []
        for rid, token in res.sampled.items():
            t = self._tracked[rid]
            t.out.token_times.append(now)
            if t.out.first_token_time is None:
                t.out.first_token_time = now
            if t.out.logprobs is not None:
                t.out.logprobs.append(res.logprobs[rid])
            if rid not in finished and self._hit_stop_string(t, token):
                self.scheduler.finish(rid, FinishReason.STOP)
                finished.add(rid)
            if rid in finished:
                done.append(self._complete(t))
        return StepOutput(res.sampled, res.logprobs, done)

    def _hit_stop_string(self, t: _Tracked, token: int) -> bool:
        if t.detok is None:
            return False
        delta = t.detok.push(token)
        return bool(delta) and find_stop(t.detok.text, t.req.params.stop, len(delta)) is not None

    def _complete(self, t: _Tracked) -> RequestOutput:
        req, out = t.req, t.out
        out.token_ids = req.output_token_ids
        out.finish_reason = req.finish_reason.value if req.finish_reason else "abort"
        out.num_preemptions = req.num_preemptions
        if self.tokenizer is not None:
            out.text = self._final_text(t)
        self.runner.release(req.request_id)
        del self._tracked[req.request_id]
        return out

    def _final_text(self, t: _Tracked) -> str:
        return final_text(self.tokenizer, t.req.output_token_ids, t.req.params)
