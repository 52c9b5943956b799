"""The prefetch worker: one per compute replica. It runs prefill, writes the KV into the
node's KV store, and moves KV between the store and its replica's device pool ahead of the
replica's batch schedule (GPU-Prefetch-For-GPU; on the CPU both pools are shared memory).

Two loops, each on its own thread (the prefill loop shares the node's cores with the
replica's decode loop, `cores.py`; with `prefill_on: replica` the replica prefills and only
the transfer loop runs):
- prefill: FCFS over the Redis prefill queue under a token budget (the engine's FCFS policy
  with `max_num_batched_tokens`). After a request's first token it copies the prompt's KV
  into store blocks owned by the request id, then publishes the token and puts the request
  in the decode index in one Redis transaction. When the store is full the request waits
  here (admission control). A request resumed after its holder died comes back with the
  output its client already has: prompt + output are recomputed and it continues.
- transfers: the replica's KVTransfers, strictly in `seq` order. After each one it writes
  the seq into slot 0 of the device arena's header, which the replica polls (no RPC).
A third kind of call runs on its own threads (Ray concurrency group "pull"): `pull_remote`
moves a request that was prefilled on another node from that node's KV store into this
node's store over the store's gRPC service, block by block as they arrive, while the replica
keeps decoding; the replica adds the request to its pool once the pull returns.

On CUDA the transfer loop would copy host -> this GPU -> the replica's GPU over NVLink (IPC
handles / peer access) on a side stream; that path is not exercised in CI (no GPU here).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal

import ray
import redis
import torch
from ray.actor import ActorHandle

from alignedserve.engine.config import EngineConfig
from alignedserve.engine.llm_engine import LLMEngine, StepOutput
from alignedserve.global_queue.connection import connect
from alignedserve.global_queue.events import TokenEvent, publish
from alignedserve.global_queue.index import RedisQueueIndex
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.global_queue.nodes import cordoned, store_address
from alignedserve.global_queue.records import (
    RequestRecord,
    claim_prefill,
    hand_off,
    is_aborted,
    load_records,
    set_kv_location,
    set_prefilled,
)
from alignedserve.kv_store.grpc_service import RemoteKVStoreClient, pull_into
from alignedserve.kv_store.shm_arena import ArenaSpec, ShmArena
from alignedserve.kv_store.store import allocate_wait
from alignedserve.logs import configure_logging
from alignedserve.logs import rid as log_rid
from alignedserve.prefetch_workers.cores import HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, CoreShare
from alignedserve.scheduling.block_manager import blocks_for
from alignedserve.scheduling.interface import KVTransfer

log = logging.getLogger("alignedserve.prefetch")
HEADER_DONE_SEQ = 0  # device-arena header slot: every transfer with seq <= it has finished
_IDLE_WAIT_S = 0.25  # an idle prefill loop waits this long at most for the work channel
_CORDON_EVERY_S = 1.0  # how often the prefill loop checks whether its node is cordoned
PULL_THREADS = 2  # concurrent cross-node pulls (the actor's "pull" concurrency group)


@dataclass(frozen=True)
class PrefetchConfig:
    engine: EngineConfig  # prefill engine (fcfs); max_num_batched_tokens is the prefill budget
    redis_url: str
    keys: RedisKeys
    worker_id: str  # pairs with the compute replica of the same id
    admission_timeout_s: float = 600.0  # a prefilled request waits this long for store room
    pull_timeout_s: float = 60.0  # a cross-node KV pull that takes longer has failed
    redis_outage_s: float = 60.0  # ServeConfig.redis_outage_s
    log_level: str = "INFO"  # ServeConfig.log_level
    pair_threads: int = 1  # torch threads while the replica is idle (cores.CoreShare)
    core_sharing: Literal["split", "alternate"] = "split"  # ServeConfig.core_sharing
    run_prefill: bool = True  # False: the replica prefills (ServeConfig.prefill_on); KV only
    compute_nice: int | None = None  # ServeConfig.compute_nice


@dataclass
class PrefetchStats:
    prefills: int = 0  # requests prefilled
    prefill_tokens: int = 0
    prefill_s: float = 0.0  # seconds in prefill steps
    admission_waits: int = 0  # times the store was full when a prefill finished
    transfers: int = 0  # KVTransfers run for the replica
    bytes: int = 0  # bytes moved between the store and the replica's device pool
    copy_s: float = 0.0
    remote_pulls: int = 0  # requests whose KV it pulled from another node's store
    remote_bytes: int = 0  # KV bytes those pulls moved over gRPC
    remote_s: float = 0.0  # seconds the pulls took (each overlaps the replica's decode)
    remote_failures: int = 0  # pulls that failed (the store or its node was gone)


class PrefetchWorker:
    """Run as a Ray actor (`PrefetchWorkerActor`); the methods below are its RPCs."""

    def __init__(self, cfg: PrefetchConfig, store: ActorHandle, device: ArenaSpec) -> None:
        from alignedserve.kv_store.client import KVStoreClient

        configure_logging(cfg.log_level)
        self.cfg = cfg
        self.engine = LLMEngine(cfg.engine)
        self.store = store
        self.host = KVStoreClient(store)
        self.device = ShmArena.attach(device)
        self.node = ray.get_runtime_context().get_node_id()
        self._remotes: dict[str, RemoteKVStoreClient] = {}  # by store address
        self._pull_lock = threading.Lock()
        self.r = connect(cfg.redis_url, cfg.redis_outage_s)
        self.index = RedisQueueIndex(self.r, cfg.keys)
        self.stats = PrefetchStats()
        self._arrivals: dict[str, float] = {}  # request id -> its router arrival (time.time())
        self._stop = threading.Event()
        self._pending: dict[int, KVTransfer] = {}
        self._cv = threading.Condition()
        self._next_seq = int(self.device.header[HEADER_DONE_SEQ]) + 1
        self.cores = CoreShare(self.device.header, HEADER_WORKER_BUSY, HEADER_REPLICA_BUSY,
                               cfg.engine.num_threads or 1, cfg.pair_threads, cfg.core_sharing,
                               nice=cfg.compute_nice)
        self._error: BaseException | None = None
        loops = [(self._transfer_loop, "transfers")]
        if cfg.run_prefill:
            loops.append((self._prefill_loop, "prefill"))
        self._threads = [threading.Thread(target=self._guard, args=(f,), daemon=True, name=n)
                         for f, n in loops]
        for t in self._threads:
            t.start()

    # -- RPCs ---------------------------------------------------------------------------------

    def submit_transfers(self, transfers: tuple[KVTransfer, ...]) -> None:
        with self._cv:
            for t in transfers:
                self._pending[t.seq] = t
            self._cv.notify()

    @ray.method(concurrency_group="pull")
    def pull_remote(self, request_id: str, node: str, num_blocks: int) -> list[int]:
        """Move a request's KV (its first `num_blocks` blocks) from the store on `node` into
        this node's store, streamed over gRPC, and free it there. Returns its slots here.
        Raises RuntimeError if that store is gone or fails (the caller resumes the request
        by recompute); nothing is left allocated here then."""
        t0 = time.perf_counter()
        address = store_address(self.r, self.cfg.keys, node)
        if address is None:
            with self._pull_lock:
                self.stats.remote_failures += 1
            raise RuntimeError(f"no KV store known on node {node}")
        slots = allocate_wait(self.store, request_id, num_blocks,
                              timeout_s=self.cfg.admission_timeout_s)
        try:
            remote = self._remotes.get(address)
            if remote is None:
                remote = self._remotes[address] = RemoteKVStoreClient(address)
            moved = pull_into(remote, request_id, num_blocks, self.host.arena.blocks, slots,
                              self.cfg.pull_timeout_s)
            # Here first, then gone there: whoever frees it later frees this copy.
            set_kv_location(self.r, self.cfg.keys, request_id, slots, self.node)
            remote.free(request_id)
        except Exception as e:  # grpc.RpcError, a short stream: the KV there is lost
            self.store.free.remote(request_id)
            self._remotes.pop(address, None)
            with self._pull_lock:
                self.stats.remote_failures += 1
            raise RuntimeError(f"pulling {request_id} from {address} failed: {e}") from e
        with self._pull_lock:  # PULL_THREADS pulls update these
            self.stats.remote_pulls += 1
            self.stats.remote_bytes += moved
            self.stats.remote_s += time.perf_counter() - t0
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(self.cfg.keys.counters, "kv_remote_pulls", 1)
        pipe.hincrby(self.cfg.keys.counters, "kv_remote_bytes", moved)
        pipe.execute()
        return slots

    def ping(self) -> int:
        """The paired replica's liveness probe: this process's pid (raises once a loop has
        failed)."""
        self.get_stats()
        return os.getpid()

    def get_stats(self) -> PrefetchStats:
        if self._error is not None:
            raise RuntimeError(f"prefetch worker {self.cfg.worker_id} failed") from self._error
        return self.stats

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify()
        for t in self._threads:
            t.join(timeout=10)
        self.device.close()
        self.host.close()
        for remote in self._remotes.values():
            remote.close()

    # -- transfers ----------------------------------------------------------------------------

    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:  # surfaced by get_stats (the replica's health check)
            log.exception("prefetch worker %s: %s loop failed", self.cfg.worker_id,
                          threading.current_thread().name)
            self._error = e
            raise

    def _transfer_loop(self) -> None:
        torch.set_num_threads(1)
        while not self._stop.is_set():
            with self._cv:
                while self._next_seq not in self._pending and not self._stop.is_set():
                    self._cv.wait(timeout=0.5)
                t = self._pending.pop(self._next_seq, None)
            if t is None:
                continue
            t0 = time.perf_counter()
            host = torch.tensor(t.host_blocks, dtype=torch.long)
            dev = torch.tensor(t.device_blocks, dtype=torch.long)
            if t.kind == "swap_in":
                self.device.blocks.index_copy_(0, dev, self.host.arena.blocks.index_select(0, host))
            else:
                self.host.arena.blocks.index_copy_(0, host, self.device.blocks.index_select(0, dev))
            self.stats.copy_s += time.perf_counter() - t0
            self.stats.transfers += 1
            self.stats.bytes += len(t.host_blocks) * self.device.blocks[0].nbytes
            self.device.header[HEADER_DONE_SEQ] = t.seq  # after the copy: the replica's fence
            self._next_seq = t.seq + 1

    # -- prefill ------------------------------------------------------------------------------

    def _prefill_loop(self) -> None:
        work = self.r.pubsub(ignore_subscribe_messages=True)  # this thread's own
        work.subscribe(self.cfg.keys.work_channel)
        try:
            self._prefill_until_stopped(work)
        finally:
            work.close()

    def _prefill_until_stopped(self, work: redis.client.PubSub) -> None:
        budget = self.cfg.engine.max_num_batched_tokens
        keys, me = self.cfg.keys, self.cfg.worker_id
        cordon_at, closed = 0.0, False
        while not self._stop.is_set():
            while work.get_message(timeout=0) is not None:
                pass  # the claim below sees what these announce; later ones end the wait
            if time.monotonic() - cordon_at > _CORDON_EVERY_S:
                cordon_at = time.monotonic()
                closed = self.node in cordoned(self.r, keys, "prefill")
            # Hold about a step's worth (a budget of 64-token prompts), FCFS; the rest stays
            # in the global queue, where any worker can take it and admission control
            # sees it.
            room = min(self.cfg.engine.max_num_seqs, max(1, budget // 64)) - \
                self.engine.num_requests
            if room > 0 and not closed:
                self._admit(claim_prefill(self.r, keys, me, room))
            if not self.engine.has_unfinished():
                self.cores.set_busy(False)
                work.get_message(timeout=_IDLE_WAIT_S)  # a prompt queued wakes it at once
                continue
            self.cores.before_step()  # threads: worker_threads, or the pair's if decode idles
            t0 = time.perf_counter()
            out = self.engine.step()
            self.cores.after_step()
            self.stats.prefill_s += time.perf_counter() - t0
            self._hand_off(out)

    def _admit(self, rids: list[str]) -> None:
        """Requests this worker now holds (`claim_prefill` made it their holder)."""
        for rec in admit_claimed(self.engine, self.r, self.cfg.keys, rids):
            self._arrivals[rec.request_id] = rec.arrival_time

    def _hand_off(self, out: StepOutput) -> None:
        """Requests that just sampled their first token leave for the decode index."""
        keys = self.cfg.keys
        finished = {o.request_id: o for o in out.finished}
        rids = list(out.sampled)
        aborted = {rid for rid, dead in zip(rids, is_aborted(self.r, keys, rids), strict=True)
                   if dead and rid not in finished}
        for rid in aborted:  # its client is gone: nobody reads its record any more
            log.info("aborted during prefill", extra=log_rid(rid))
            self.r.delete(keys.req(rid))
        live = [rid for rid in rids if rid not in aborted]

        def write(pipe, held: list[str]) -> None:
            # One transaction per step: each request's token, its new record fields and
            # its place in the decode index land together or not at all.
            seq = self.index.next_seqs(len(held)) if held else 0
            for i, rid in enumerate(held):
                tok = out.sampled[rid]
                lp = out.logprobs.get(rid)
                lps = (lp,) if lp is not None else None
                if rid in finished:
                    o = finished[rid]
                    publish(pipe, keys, rid, TokenEvent((tok,), len(o.token_ids),
                                                        o.finish_reason, lps))
                    continue
                req = self.engine.get_request(rid)
                if req is None:
                    raise RuntimeError(f"{rid} sampled but is not tracked")  # a bug, not input
                slots = self._to_store(rid, req.block_ids, req.num_computed_tokens)
                output = tuple(req.output_token_ids)
                set_prefilled(pipe, keys, rid, output, tuple(slots), self.node)
                publish(pipe, keys, rid, TokenEvent((tok,), len(output), None, lps))
                self.index.put_on(pipe, rid, req.num_tokens, self._arrivals[rid], seq + i)

        held = set(hand_off(self.r, keys, self.cfg.worker_id, live, write)) if live else set()
        for rid in live:
            if rid not in held:
                # A router resumed it (this pair looked dead): another worker recomputes it.
                # Whatever store blocks this worker took for it are left under the id: the
                # new holder's allocation grows from them and overwrites them.
                log.warning("no longer held (resumed elsewhere): dropped", extra=log_rid(rid))
            elif rid not in finished:
                req = self.engine.get_request(rid)
                self.stats.prefills += 1
                self.stats.prefill_tokens += req.num_prompt_tokens if req else 0
        for rid in rids:
            if rid not in finished:
                self.engine.detach(rid)
            self._arrivals.pop(rid, None)

    def _to_store(self, rid: str, device_blocks: list[int], num_tokens: int) -> list[int]:
        """Copy a prefilled request's KV into store blocks it owns; waits while the store is
        full (nothing is dropped)."""
        n = blocks_for(num_tokens, self.engine.cfg.block_size)
        try:
            slots = allocate_wait(self.store, rid, n, timeout_s=0.0)
        except TimeoutError:  # the store is full: wait for room (admission control)
            log.info("KV store full; prefilled request waits for room", extra=log_rid(rid))
            self.stats.admission_waits += 1
            slots = allocate_wait(self.store, rid, n, timeout_s=self.cfg.admission_timeout_s)
        self.host.arena.blocks.index_copy_(0, torch.tensor(slots[:n]),
                                           self.engine.read_kv(device_blocks[:n]))
        return slots


def admit_claimed(engine: LLMEngine, r: redis.Redis, keys: RedisKeys,
                  rids: list[str], kept: set[str] | None = None) -> list[RequestRecord]:
    """Queue the requests `claim_prefill` just gave this process in `engine`: a resumed one
    with the output its client already has (prompt + output are recomputed). A request the
    engine cannot serve gets an error event instead. Returns the records admitted.

    A request this engine still serves comes back when a router took this process for dead
    while it was only slow (its heartbeat stalled) and resumed it: the claim makes this
    process its holder again, and the engine keeps serving it as it was (its id goes into
    `kept`: the abort the router sent with the resume is for the hold it ended)."""
    if not rids:
        return []
    admitted: list[RequestRecord] = []
    pipe = r.pipeline(transaction=False)
    for rec in load_records(r, keys, rids):
        if engine.get_request(rec.request_id) is not None:
            log.warning("claimed a request it still serves (resumed while alive): keeps it",
                        extra=log_rid(rec.request_id))
            if kept is not None:
                kept.add(rec.request_id)
            continue
        if rec.output_token_ids:
            log.info("resumed after %d tokens: recomputing", len(rec.output_token_ids),
                     extra=log_rid(rec.request_id))
        try:
            engine.add_request(list(rec.prompt_token_ids), rec.params, rec.request_id,
                               arrived_at=rec.arrival_time, output_ids=rec.output_token_ids)
            admitted.append(rec)
        except ValueError as e:
            log.warning("rejected at prefill: %s", e, extra=log_rid(rec.request_id))
            publish(pipe, keys, rec.request_id, TokenEvent((), 0, error=str(e)))
    pipe.execute()
    return admitted
