"""Discrete-event simulation of compute/prefetch device pairs driven by the real policies.

Each pair runs the very classes the engine runs (`FCFSScheduler`, `AlignedScheduler` from
`scheduling/`) through the same `schedule()` / `update()` / `transfers_done()` contract; only
the executor is simulated: a step takes `CostModel.step` seconds instead of running a model,
and every sampled token is a constant (requests run to their `max_tokens`, as with
`ignore_eos`). How requests reach pairs (round-robin shards, or the deployed global
dispatch) and the cluster-level `simulate` live in `sim/router.py`.

Per pair:
- `fcfs`: one device does prefill and decode in the same steps (vLLM-style).
- `fcfs` with `disagg`: the decode device runs FCFS decode only; prefill runs on a second
  device beside it, like the aligned pair's prefetch device (DistServe-style).
- `fcfs-sorted`: FCFS whose waiting queue is kept sorted by prompt length: an oracle of
  cheap alignment (it needs every request in the queue at once to mean much).
- `aligned`: the compute device decodes; the paired prefetch device runs prefill and
  carries KV swaps (`links.CopyLinks`), overlapping compute; the scheduler's fences decide
  when a step waits on a copy.
- With a second device (`aligned`, `fcfs` with `disagg`), prefill runs asynchronously on
  its own timeline (`_split_side`): the decode device does not wait for it; a request
  decodes once its prompt's KV has crossed NVLink, and the prefill device takes the
  scheduler's next chunks as soon as it is free.
- `aligned` with `prefetch=False` (the paper's ablation): no prefetch device. KV goes
  host <-> compute over the compute device's PCIe, synchronously (a step waits for the
  copies it issued, as vLLM's swap-in does), and prefill shares the compute device.

A pair may also be assigned a request whose KV is still crossing from another node
(`admit(..., pull)`, multi-node dispatch, `sim/nodes.py`): it holds a place in the pair's
inflight count and joins the scheduler when the pull lands.

Events, counted for the throughput figure: arrivals, steps, KV copies (pulls from other
nodes included) and completions.
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from alignedserve.scheduling.aligned import AlignedScheduler
from alignedserve.scheduling.aligned_config import AlignedConfig, AlignedKnobs
from alignedserve.scheduling.block_manager import BlockAllocator, KVBlockManager
from alignedserve.scheduling.fcfs import FCFSScheduler, SchedulerLimits
from alignedserve.scheduling.interface import Scheduler, SchedulerOutput
from alignedserve.scheduling.request import Request
from alignedserve.sim.config import SimConfig
from alignedserve.sim.cost_model import VLLM_V1_MAX_LEN, CostModel
from alignedserve.sim.links import CopyLinks
from alignedserve.sim.nodes import Pull
from alignedserve.sim.workload import TOKEN, SimWorkload, make_request


@dataclass
class PairResult:
    """What one pair did. Times are simulated seconds; arrays follow the shard's order."""

    ttft_s: np.ndarray  # [n] first token - arrival
    tpot_s: np.ndarray  # [n] (finish - first token) / (output - 1); nan for 1-token outputs
    output: np.ndarray  # [n] tokens generated
    step_s: np.ndarray  # [steps] float32 step times
    steps: int = 0
    busy_s: float = 0.0  # compute device time spent in steps
    stall_s: float = 0.0  # time steps waited on KV copies
    straggler_s: float = 0.0  # decode attention above the batches' total KV (CostModel)
    copy_s: float = 0.0  # summed KV copy time over both link directions
    switches: int = 0
    decode_seqs: int = 0  # decode tokens summed over steps (mean batch = this / steps)
    end_s: float = 0.0
    events: int = 0
    peak_host_blocks: int = 0  # most host-pool blocks held at once
    block_bytes: int = 0
    stats: dict[str, int] = field(default_factory=dict)  # AlignedStats and SwapStats
    prompt: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # [n] tokens
    # [n] s from dispatch until its KV, pulled from another node, landed; nan: local
    pull_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    pull_bytes: int = 0  # KV bytes pulled from other nodes


def _device_blocks(cfg: SimConfig, cost: CostModel) -> int:
    free_hbm = cost.hw.hbm_gib * 2**30 - cost.m.params * 2
    if free_hbm <= 0:
        raise ValueError(f"{cost.m.name} does not fit in {cost.hw.name}'s HBM")
    return max(1, int(free_hbm * cfg.kv_mem_fraction // cost.kv_bytes(1, cfg.block_size)))


def make_scheduler(cfg: SimConfig, cost: CostModel) -> Scheduler:
    """The engine's own policy class for `cfg`, over simulated device and host pools."""
    device = KVBlockManager(_device_blocks(cfg, cost), cfg.block_size)
    if cfg.policy in ("fcfs", "fcfs-sorted"):
        kind = SortedFCFSScheduler if cfg.policy == "fcfs-sorted" else FCFSScheduler
        return kind(device, SchedulerLimits(cfg.max_num_seqs, cfg.max_num_batched_tokens))
    host_blocks = max(1, int(cfg.host_pool_gib * 2**30 // cost.kv_bytes(1, cfg.block_size)))
    knobs = {name: getattr(cfg, name) for name in AlignedKnobs.model_fields}
    knobs["align_by"] = cfg.kernel_align_by
    # vLLM's dispatch takes PagedAttention V2 (512-token partitions: no straggler) once a
    # member passes 8,192 tokens; the policy knows it, as it would on such a GPU.
    knobs["split_above_tokens"] = VLLM_V1_MAX_LEN if cfg.kernel == "vllm" else None
    return AlignedScheduler(device, BlockAllocator(host_blocks), AlignedConfig(
        **{**knobs, "min_batch": min(cfg.min_batch, cfg.max_num_seqs)},
        max_batch=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens))


class SortedFCFSScheduler(FCFSScheduler):
    """`fcfs-sorted`: new requests wait in prompt-length order instead of arrival order
    (preempted ones still go back to the front)."""

    def add_request(self, req: Request) -> None:
        super().add_request(req)
        self.waiting.pop()
        keys = [r.num_prompt_tokens for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, req.num_prompt_tokens), req)


class SimPair:
    """One compute device (+ prefetch device) with its own policy instance."""

    def __init__(self, cfg: SimConfig, cost: CostModel) -> None:
        self.cfg, self.cost = cfg, cost
        self.now = 0.0
        self.scheduler = make_scheduler(cfg, cost)
        self.block_bytes = cost.kv_bytes(1, cfg.block_size)
        self.links = CopyLinks(cost, cfg.prefetch, self.block_bytes)
        self._side = cfg.side_device  # prefill on the pair's second device

    def _step_time(self, out: SchedulerOutput) -> tuple[float, float, int, list[str]]:
        """(seconds, the straggler's share of them, decode sequences, ids of the requests
        that sample: decodes and last prefill chunks) of one colocated step; one pass over
        the chunks, as this runs once per simulated step."""
        decode, prefill, sampled = [], [], []
        for c in out.chunks:
            start, n, req = c.start, c.num_new_tokens, c.request
            if n == 1 and start > 0:
                decode.append(start + 1)  # KV length attended, the new token's included
            else:
                prefill.append((start, n))
            if start + n == len(req.token_ids):
                sampled.append(req.request_id)
        return *self.cost.step_parts(decode, prefill), len(decode), sampled

    def _split_side(self, out: SchedulerOutput
                    ) -> tuple[SchedulerOutput, float, float, int, list[str]]:
        """A step of a pair whose second device runs prefill asynchronously: (the chunks
        that run, decode device seconds, their straggler share, decode sequences, ids that
        sample now: decodes and last prefill chunks that run).

        Decodes run on the decode device; a decode whose prefill KV has not landed yet (the
        prefill device is still on it) sits this step out. The step's prefill chunks run as
        one prefill step on the prefill device's own timeline when it will be free by the
        end of this decode step; otherwise they sit out (the scheduler offers them again).
        A prompt's first token exists when its last chunk and the KV copy over NVLink have
        landed."""
        run, decode, sampled, prefill = [], [], [], []
        ready, now = self._ready, self.now
        for c in out.chunks:  # once per chunk of every step: the chunk's properties inlined
            start = c.start
            if c.num_new_tokens == 1 and start > 0:
                req = c.request
                rid = req.request_id
                landed = ready.get(rid) if ready else None
                if landed is not None:
                    if landed > now:
                        continue
                    del ready[rid]
                run.append(c)
                decode.append(start + 1)
                if start + 1 == len(req.token_ids):
                    sampled.append(rid)
            else:
                prefill.append(c)
        dt, straggler = self.cost.step_parts(decode, [])
        if prefill and self._prefill_free <= self.now + dt:  # else the chunks wait a step
            kv = sum(c.num_new_tokens for c in prefill) * self.cost.m.kv_bytes_per_token
            begin = max(self.now, self._prefill_free)
            self._prefill_free = begin + self.cost.nvlink(kv) + self.cost.step(
                [], [(c.start, c.num_new_tokens) for c in prefill])
            for c in prefill:  # one prefill step on the second device, as the engine runs it
                self._ready[c.request.request_id] = self._prefill_free
                run.append(c)
                if c.end == len(c.request.token_ids):
                    sampled.append(c.request.request_id)
                    k = self._pos[c.request.request_id]
                    if math.isnan(self._first[k]):
                        self._first[k] = self._prefill_free
        kept = SchedulerOutput(tuple(run), out.preempted, out.batch_switch, out.transfers,
                               out.fence)
        return kept, dt, straggler, len(decode), sampled

    def _wait(self, seq: int, res: PairResult) -> None:
        if seq <= self.links.done_seq:
            return
        done = self.links.done_time(seq)
        res.stall_s += max(0.0, done - self.now)
        self.now = max(self.now, done)
        self.scheduler.transfers_done(self.links.advance(self.now))

    def run(self, shard: SimWorkload) -> PairResult:
        """Simulate `shard` (sorted by arrival) to completion."""
        n = len(shard)
        arrival = shard.arrival.tolist()
        self.begin()
        i = 0
        while i < n or self.scheduler.has_unfinished():
            while i < n and arrival[i] <= self.now:
                self.admit(int(shard.prompt[i]), int(shard.output[i]), arrival[i])
                i += 1
            self.step(arrival[i] if i < n else None)
        return self.result()

    # -- step-wise use (run, and the dispatch-routed cluster) ---------------------------------

    def begin(self) -> None:
        nan = float("nan")
        self._nan = nan
        self._first: list[float] = []  # simulated s per admitted request; lists: numpy
        self._finish: list[float] = []  # scalars are slow here
        self._prompt: list[int] = []
        self._output: list[int] = []
        self._arrival: list[float] = []
        self._pos: dict[str, int] = {}
        self._pull_s: list[float] = []
        self._pulling: list[tuple[float, int, Request]] = []  # heap: (landed s, k, request)
        self._step_s: list[float] = []
        self._idle = 0  # consecutive empty schedules that moved no KV
        self._prefill_free = 0.0  # side device: its prefill timeline is busy until then
        self._ready: dict[str, float] = {}  # side device: prompt KV lands on the decode device
        self._res = PairResult(np.empty(0), np.empty(0), np.empty(0), np.empty(0))

    @property
    def num_requests(self) -> int:
        """Admitted (KV pulls in flight included) and not finished."""
        return len(self._pos)

    @property
    def has_work(self) -> bool:
        return bool(self._pulling) or self.scheduler.has_unfinished()

    @property
    def next_event(self) -> float:
        """When this pair next acts: now, or, idle with pulls in flight, the first landing."""
        if self._pulling and not self.scheduler.has_unfinished():
            return max(self.now, self._pulling[0][0])
        return self.now

    def admit(self, prompt: int, output: int, arrival: float, pull: Pull | None = None) -> None:
        """Assign a request; with `pull` (its KV comes from another node) it joins the
        scheduler once the pull has landed, until then it only holds a place."""
        k = len(self._first)
        req = make_request(k, prompt, output, arrival)
        self._pos[req.request_id] = k
        self._first.append(self._nan)
        self._finish.append(self._nan)
        self._prompt.append(prompt)
        self._output.append(output)
        self._arrival.append(arrival)
        self._pull_s.append(self._nan if pull is None else pull.wait_s)
        if pull is not None:
            self._res.pull_bytes += pull.nbytes
        if pull is None or pull.landed <= self.now:
            self.scheduler.add_request(req)
        else:
            heapq.heappush(self._pulling, (pull.landed, k, req))

    def _join_landed(self) -> None:
        """Requests whose KV has landed join the scheduler (an idle pair waits for one)."""
        self.now = self.next_event
        while self._pulling and self._pulling[0][0] <= self.now:
            self.scheduler.add_request(heapq.heappop(self._pulling)[2])

    def step(self, next_arrival: float | None) -> None:
        """One scheduler step (or, when nothing can run, a jump to the next event: a copy
        or a pulled request's KV landing, or `next_arrival`)."""
        sched, links, res = self.scheduler, self.links, self._res
        self._join_landed()
        sched.transfers_done(links.advance(self.now))
        out = sched.schedule()
        links.start(out.transfers, self.now)
        if not self.cfg.prefetch and out.transfers:  # ablation: synchronous copies
            self._wait(out.transfers[-1].seq, res)
        self._wait(out.fence, res)
        if out.empty:
            # Copies this schedule issued (and, in the ablation, already waited for) can
            # free device blocks, so an empty step that moved KV is progress: retry.
            self._idle = 0 if out.transfers else self._idle + 1
            pulled = self._pulling[0][0] if self._pulling else None
            nxt = [t for t in (next_arrival, links.next_landing(), pulled) if t is not None]
            if nxt:
                self.now = max(self.now, min(nxt))
            elif self._idle > 1 and sched.has_unfinished():
                raise RuntimeError("simulated pair stalled with work left")
            return
        if self._side:
            out, dt, straggler, ndec, ids = self._split_side(out)
            if not out.chunks:  # everything waits on the prefill device: jump to it
                later = [t for t in (self._prefill_free, *self._ready.values()) if t > self.now]
                if not later:
                    raise RuntimeError("simulated pair: chunks held with nothing pending")
                self.now = min(later)
                return
        else:
            dt, straggler, ndec, ids = self._step_time(out)
        self._idle = 0
        self.now += dt
        if dt:
            self._step_s.append(dt)
        res.busy_s += dt
        res.straggler_s += straggler
        res.decode_seqs += ndec
        res.switches += out.batch_switch
        sampled = dict.fromkeys(ids, TOKEN)  # ids: every chunk that reaches its end
        for rid in ids:
            k = self._pos[rid]
            if math.isnan(self._first[k]):  # this is its first token
                self._first[k] = self.now
        for r in sched.update(out, sampled):
            self._ready.pop(r.request_id, None)
            self._finish[self._pos.pop(r.request_id)] = self.now
        self._track_host(res)

    def result(self) -> PairResult:
        shard = SimWorkload("", np.asarray(self._prompt, dtype=np.int64),
                            np.asarray(self._output, dtype=np.int64),
                            np.asarray(self._arrival, dtype=np.float64))
        self._res.output = shard.output.copy()
        self._res.pull_s = np.asarray(self._pull_s, dtype=np.float64)
        return self._finish_result(self._res, shard, self._first, self._finish, self._step_s)

    def _track_host(self, res: PairResult) -> None:
        used = self.scheduler.host_blocks_used  # once per step: not the whole stats()
        if used > res.peak_host_blocks:
            res.peak_host_blocks = used

    def _finish_result(self, res: PairResult, shard: SimWorkload, first_s: list[float],
                       finish_s: list[float], step_s: list[float]) -> PairResult:
        first, finish = np.asarray(first_s), np.asarray(finish_s)
        res.ttft_s = first - shard.arrival
        res.prompt = shard.prompt
        gen = shard.output.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            res.tpot_s = np.where(gen > 1, (finish - first) / (gen - 1), np.nan)
        res.step_s = np.asarray(step_s, dtype=np.float32)
        res.steps, res.end_s, res.block_bytes = len(step_s), self.now, self.block_bytes
        res.copy_s = self.links.busy_s
        pulls = int(np.count_nonzero(~np.isnan(res.pull_s)))
        res.events = len(shard) * 2 + res.steps + self.links.copies + pulls
        res.stats |= self.scheduler.stats().counters
        return res
