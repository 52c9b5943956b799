"""Discrete-event simulation of compute/prefetch device pairs driven by the real policies.

Each pair runs the very classes the engine runs (`FCFSScheduler`, `AlignedScheduler` from
`scheduling/`) through the same `schedule()` / `update()` / `transfers_done()` contract; only
the executor is simulated: a step takes `CostModel.step` seconds instead of running a model,
and every sampled token is a constant (requests run to their `max_tokens`, as with
`ignore_eos`). The router assigns requests to pairs round-robin in arrival order, so pairs
never interact afterwards and are simulated one after another.

Per pair:
- `fcfs`: one device does prefill and decode in the same steps (vLLM-style).
- `aligned`: the compute device decodes; the paired prefetch device runs the prefill chunks
  of the same step in parallel (their KV crosses NVLink) and carries KV swaps:
  host -> prefetch device over its PCIe link, then over NVLink into the compute device,
  overlapping compute (the scheduler's fences decide when a step must wait).
- `aligned` with `prefetch=False` (the paper's ablation): no prefetch device. KV goes
  host -> compute over the compute device's PCIe, and prefill shares the compute device.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from alignedserve.scheduling.aligned import AlignedConfig, AlignedScheduler
from alignedserve.scheduling.block_manager import BlockAllocator, KVBlockManager
from alignedserve.scheduling.fcfs import FCFSScheduler, SchedulerLimits
from alignedserve.scheduling.interface import Scheduler, SchedulerOutput
from alignedserve.scheduling.request import Request
from alignedserve.scheduling.sampling_params import SamplingParams
from alignedserve.sim.cost_model import CostModel, hardware, model

TOKEN = 1  # every simulated sample


@dataclass(frozen=True)
class SimConfig:
    hardware: str = "h100-sxm"
    model: str = "opt-13b"
    policy: str = "aligned"  # "aligned" | "fcfs"
    pairs: int = 1  # compute devices (each aligned one has a prefetch device beside it)
    prefetch: bool = True  # aligned: GPU-Prefetch-For-GPU; False = the ablation
    split_kv: bool = False  # a load-balanced decode kernel (see cost_model)
    block_size: int = 16
    kv_mem_fraction: float = 0.9  # of HBM left after the weights, for the device KV pool
    host_pool_gib: float = 100.0  # per pair
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    min_batch: int = 36  # the paper's Kmin
    max_spread: float = 1.5
    slack_tokens: int = 128
    batch_kv_fraction: float = 0.4  # the paper's Bmax
    max_queue_delay_s: float = 10.0
    min_batch_steps: int = 8

    def __post_init__(self) -> None:
        if self.policy not in ("aligned", "fcfs"):
            raise ValueError(f"policy must be aligned or fcfs, got {self.policy!r}")
        if self.pairs < 1:
            raise ValueError("pairs must be >= 1")


@dataclass
class PairResult:
    """What one pair did. Times are simulated seconds."""

    steps: int = 0
    busy_s: float = 0.0  # compute device time spent in steps
    stall_s: float = 0.0  # time steps waited on KV copies
    switches: int = 0
    end_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    first_token: dict[str, float] = field(default_factory=dict)
    finish: dict[str, float] = field(default_factory=dict)


class SimPair:
    """One compute device (+ prefetch device) with its own policy instance."""

    def __init__(self, cfg: SimConfig, cost: CostModel) -> None:
        self.cfg, self.cost = cfg, cost
        self.now = 0.0
        bs = cfg.block_size
        free_hbm = cost.hw.hbm_gib * 2**30 - cost.m.params * 2
        self.block_bytes = cost.kv_bytes(1, bs)
        device_blocks = max(1, int(free_hbm * cfg.kv_mem_fraction // self.block_bytes))
        device = KVBlockManager(device_blocks, bs)
        self.scheduler: Scheduler
        if cfg.policy == "aligned":
            host_blocks = max(1, int(cfg.host_pool_gib * 2**30 // self.block_bytes))
            self.scheduler = AlignedScheduler(device, BlockAllocator(host_blocks), AlignedConfig(
                max_batch=cfg.max_num_seqs, min_batch=min(cfg.min_batch, cfg.max_num_seqs),
                max_spread=cfg.max_spread, slack_tokens=cfg.slack_tokens,
                batch_kv_fraction=cfg.batch_kv_fraction,
                max_queue_delay_s=cfg.max_queue_delay_s, min_batch_steps=cfg.min_batch_steps,
                max_num_batched_tokens=cfg.max_num_batched_tokens), clock=lambda: self.now)
        else:
            self.scheduler = FCFSScheduler(device, SchedulerLimits(
                cfg.max_num_seqs, cfg.max_num_batched_tokens))
        self.device_blocks = device_blocks
        self._link_free = 0.0  # the KV copy path is busy until then
        self._copies: list[tuple[int, float]] = []  # heap of (seq, done time)
        self._done_seq = 0

    def _copy_time(self, nbytes: int) -> float:
        if self.cfg.prefetch:  # host -> prefetch device -> compute device, pipelined
            return max(self.cost.pcie(nbytes), self.cost.nvlink(nbytes))
        return self.cost.pcie(nbytes)

    def _start_copies(self, out: SchedulerOutput) -> None:
        for t in out.transfers:
            start = max(self._link_free, self.now)
            self._link_free = start + self._copy_time(len(t.host_blocks) * self.block_bytes)
            heapq.heappush(self._copies, (t.seq, self._link_free))

    def _retire_copies(self, upto_time: float) -> None:
        while self._copies and self._copies[0][1] <= upto_time:
            self._done_seq = heapq.heappop(self._copies)[0]
        self.scheduler.transfers_done(self._done_seq)

    def _step_time(self, out: SchedulerOutput) -> float:
        decode = [c.end for c in out.chunks if c.is_decode]
        prefill = [(c.start, c.num_new_tokens) for c in out.chunks if not c.is_decode]
        if self.cfg.policy == "aligned" and self.cfg.prefetch and prefill:
            kv = sum(n for _, n in prefill) * self.cost.m.kv_bytes_per_token
            side = self.cost.step([], prefill) + self.cost.nvlink(kv)
            return max(self.cost.step(decode, []), side)
        return self.cost.step(decode, prefill)

    def run(self, requests: list[tuple[float, Request]]) -> PairResult:
        """Simulate `requests` ((arrival s, request), sorted by arrival) to completion."""
        res = PairResult()
        i = 0
        sched = self.scheduler
        while i < len(requests) or sched.has_unfinished():
            while i < len(requests) and requests[i][0] <= self.now:
                sched.add_request(requests[i][1])
                i += 1
            self._retire_copies(self.now)
            out = sched.schedule()
            self._start_copies(out)
            if not self.cfg.prefetch:  # ablation: copies block the step that issued them
                self._wait_copies(max((t.seq for t in out.transfers), default=0), res)
            self._wait_copies(out.fence, res)
            if out.empty:
                nxt = [requests[i][0]] if i < len(requests) else []
                nxt += [done for _, done in self._copies]
                if not nxt:
                    raise RuntimeError("simulated pair stalled with work left")
                self.now = max(self.now, min(nxt))
                continue
            dt = self._step_time(out)
            self.now += dt
            res.steps += 1
            res.busy_s += dt
            res.switches += out.batch_switch
            res.step_s.append(dt)
            sampled = {c.request.request_id: TOKEN for c in out.chunks if c.samples}
            for rid in sampled:
                res.first_token.setdefault(rid, self.now)
            for r in sched.update(out, sampled):
                res.finish[r.request_id] = self.now
        res.end_s = self.now
        return res

    def _wait_copies(self, seq: int, res: PairResult) -> None:
        if seq <= self._done_seq:
            return
        done = max(t for s, t in self._copies if s <= seq)
        res.stall_s += max(0.0, done - self.now)
        self.now = max(self.now, done)
        self._retire_copies(self.now)


def make_requests(workload: list, num_pairs: int) -> list[list[tuple[float, Request]]]:
    """Round-robin routing of loadgen WorkloadRequests (by arrival) to pairs."""
    shards: list[list[tuple[float, Request]]] = [[] for _ in range(num_pairs)]
    order = sorted(range(len(workload)), key=lambda k: workload[k].arrival_s)
    for n, k in enumerate(order):
        w = workload[k]
        params = SamplingParams(max_tokens=w.max_tokens, temperature=0.0, ignore_eos=True)
        req = Request(f"r{k}", w.prompt_token_ids, params, frozenset(),
                      arrival_time=w.arrival_s)
        shards[n % num_pairs].append((w.arrival_s, req))
    return shards


def simulate(cfg: SimConfig, workload: list) -> list[PairResult]:
    cost = CostModel(hardware(cfg.hardware), model(cfg.model), split_kv=cfg.split_kv)
    return [SimPair(cfg, cost).run(shard) for shard in make_requests(workload, cfg.pairs)]
