"""The compute replica: the decode loop over the requests the scheduler leader assigns it.

Start-up: load the model, create the device KV pool as a shared-memory arena, start the
paired prefetch worker (which maps that arena and the node's KV store), make sure the
node's store serves gRPC to other nodes, and register in Redis. Then one thread loops:
1. take newly assigned requests from this replica's Redis inbox (their prompt KV is in the
   KV store, written by a prefetch worker) into the engine's host pool; a request
   prefilled on another node first has its KV pulled into this node's store by the
   prefetch worker (gRPC, while decoding goes on) and joins when the pull returns, or, if
   that node is gone, goes back to the prefill queue to be recomputed;
   with `prefill_on: replica`, also take prompts off the prefill queue (as a worker would)
   and prefill them in its own steps, mixed with decode;
2. abort requests the router abandoned (Redis pub/sub);
3. run one step of the engine's batch-level scheduler (aligned batches, candidate buffers,
   swaps) whose KV copies the prefetch worker performs ahead of time;
4. publish every new token to its request's Redis stream, in one pipeline per step;
5. keep this replica's state (pool sizes, usage) for the leader and `alignedserve status`.

A heartbeat thread (`liveness.py`) publishes that state every 0.25 s (at once when the
room moves) and watches the prefetch worker: if the worker died, the replica withdraws its
state and fails its health check, so Serve replaces the pair. The routers ask Ray about
the actors named in the state when it stops refreshing (`deployments/liveness.py`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from alignedserve.config import ServeConfig
from alignedserve.deployments.limits import engine_config, serving_limits
from alignedserve.deployments.metrics import EngineMetrics
from alignedserve.deployments.replica.liveness import ReplicaLiveness, serve_store
from alignedserve.engine.llm_engine import EngineParts, LLMEngine
from alignedserve.global_queue.connection import connect
from alignedserve.global_queue.events import TokenEvent, publish
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.global_queue.nodes import cordoned
from alignedserve.global_queue.records import (
    ReplicaState,
    RequestRecord,
    claim_prefill,
    is_aborted,
    load_records,
    resume,
)
from alignedserve.kv_store.host_allocator import StoreHostAllocator
from alignedserve.kv_store.shm_arena import ShmArena, remove_orphans
from alignedserve.kv_store.store import get_or_create_store
from alignedserve.logs import configure_logging
from alignedserve.logs import rid as log_rid
from alignedserve.prefetch_workers.cores import HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, CoreShare
from alignedserve.prefetch_workers.transfer_client import PrefetchTransferQueue
from alignedserve.prefetch_workers.worker import (
    PULL_THREADS,
    PrefetchConfig,
    PrefetchWorker,
    admit_claimed,
)

log = logging.getLogger("alignedserve.replica")
# An idle loop waits this long at most for work (the work channel wakes it at once); while
# KV is still moving (a copy, a cross-node pull) it looks again after _BUSY_WAIT_S.
_IDLE_WAIT_S, _BUSY_WAIT_S = 0.25, 0.02
_CORDON_EVERY_S = 1.0  # prefill_on=replica: how often it checks whether its node is cordoned
_WORKER_START_S = 180.0  # a paired worker not up by then cannot be placed (or is stuck)
WORKER_STOP_S = 15.0  # how long a stopping replica waits for its prefetch worker to stop


class ComputeReplica(ReplicaLiveness):
    """Wrapped by `serve.deployment` in `deployments/app.py`."""

    def __init__(self, cfg: ServeConfig, model_dir: str) -> None:
        configure_logging(cfg.log_level)
        self.cfg = cfg
        self.keys = RedisKeys(cfg.redis_prefix)
        self.replica_id = f"r-{uuid.uuid4().hex[:8]}"
        self.r = connect(cfg.redis_url, cfg.redis_outage_s)
        ecfg = engine_config(cfg, model_dir, cfg.replica_threads)
        lim = serving_limits(cfg, model_dir).pools
        # The node's store (the first replica there starts it) and this replica's worker
        # start side by side: each is a new process that takes seconds to start.
        self.store = get_or_create_store(lim.host_blocks, lim.block_shape, lim.dtype,
                                         wait=False)
        # The device pool is created first (its size is known from the config), so the
        # worker can map it and the engine gets every part at construction.
        remove_orphans()  # arenas of replicas that were killed before unlinking theirs
        self.arena = ShmArena.create(
            f"as-dev-{self.replica_id}", lim.device_blocks, lim.block_shape, lim.dtype)
        node = self.node = ray.get_runtime_context().get_node_id()
        pcfg = PrefetchConfig(
            engine=engine_config(cfg, model_dir, cfg.worker_threads, policy="fcfs",
                                 kv_cache_gib=0.25,
                                 max_num_batched_tokens=cfg.prefill_token_budget,
                                 long_prefill_token_threshold=cfg.prefill_chunk_tokens),
            redis_url=cfg.redis_url, keys=self.keys, worker_id=self.replica_id,
            log_level=cfg.log_level, redis_outage_s=cfg.redis_outage_s,
            pair_threads=self._pair_threads(cfg), core_sharing=cfg.core_sharing,
            run_prefill=not cfg.replica_prefills, compute_nice=cfg.compute_nice)
        ctx = ray.get_runtime_context()
        worker_name = f"alignedserve-prefetch-{self.replica_id}"
        self._actors = (ctx.get_actor_name() or "", worker_name)
        self._namespace = ctx.namespace
        self.worker = ray.remote(concurrency_groups={"pull": PULL_THREADS})(
            PrefetchWorker).options(
            name=worker_name, num_cpus=cfg.worker_cpus,
            num_gpus=cfg.worker_gpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(pcfg, self.store, self.arena.spec)
        self.store_address = serve_store(self.store, cfg)  # waits for the store to start
        # The worker has mapped the arena once it answers.
        try:
            self._pids = (os.getpid(), ray.get(self.worker.ping.remote(),
                                               timeout=_WORKER_START_S))
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.worker)
            raise RuntimeError(
                f"the prefetch worker did not start on this replica's node {node} within "
                f"{_WORKER_START_S:.0f} s: does the node have room for worker_cpus="
                f"{cfg.worker_cpus} / worker_gpus={cfg.worker_gpus} beside the replica?"
            ) from None
        # Both processes hold mappings now: drop the name, so the memory goes with them
        # however they end (no /dev/shm leak if the replica is killed).
        self.arena.unlink()
        self.host = StoreHostAllocator(self.store, lim.host_blocks)
        self.transfers = PrefetchTransferQueue(self.worker, self.arena.header, lim.block_bytes)
        self.cores = CoreShare(self.arena.header, HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY,
                               cfg.replica_threads, pcfg.pair_threads, cfg.core_sharing,
                               nice=cfg.compute_nice)
        self.engine = LLMEngine(ecfg, parts=EngineParts(self._device_pool, self.host,
                                                        self.transfers))
        self.counts: dict[str, int] = {}  # request id -> output tokens so far
        # prefill_on=replica: requests claimed off the prefill queue, no token sampled yet.
        self.prefilling: set[str] = set()
        # Requests a router resumed while this replica was alive, claimed back and kept:
        # the "rid@me" abort sent with that resume is stale for them (admit_claimed).
        self._kept: set[str] = set()
        self._claim_window = max(1, ecfg.max_num_batched_tokens // 64)  # as the worker's
        self._cordon_at, self._cordoned = 0.0, False
        # Requests whose KV the worker is pulling from another node: id -> (pull, record).
        self.pulling: dict[str, tuple[ray.ObjectRef, RequestRecord]] = {}
        self.metrics = EngineMetrics(cfg.model_name, self.replica_id)
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._error: BaseException | None = None
        self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(self.keys.abort_channel, self.keys.work_channel)
        self._state_at = 0.0
        self._beat = threading.Event()
        self._last_state = self._state()
        # Published before the loop can claim a request: a router that finds a holder
        # with no state takes it for dead and resumes its requests.
        self._publish_now()
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()
        self._heart = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._heart.start()

    def _device_pool(self, num_blocks: int) -> torch.Tensor:
        if num_blocks != self.arena.spec.num_blocks:
            raise RuntimeError(f"engine wants {num_blocks} device blocks, the arena has "
                               f"{self.arena.spec.num_blocks}")
        return self.arena.blocks

    # -- Serve-facing -------------------------------------------------------------------------

    def check_health(self) -> None:
        """Serve's health check: a dead loop or prefetch worker fails the replica."""
        if self._error is not None or not self._thread.is_alive():
            raise RuntimeError(f"decode loop stopped: {self._error!r}")
        ray.get(self.worker.ping.remote(), timeout=30)

    def state(self) -> ReplicaState:
        return self._state()

    def __del__(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Drain: stop taking work, let in-flight requests finish within drain_timeout_s,
        then fail the rest with an error event (their clients get an answer, not a hang)."""
        if self._stop.is_set():
            return
        self._draining.set()  # the leader sees free=0 and stops assigning
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while (self.counts or self.pulling) and time.monotonic() < deadline and \
                self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self._beat.set()  # the heartbeat ends now, not at its next beat
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self._heart.join(timeout=5)
        try:
            self.host.settle_all()  # the frees below must not overtake an allocate
        except ray.exceptions.RayError as e:  # the store is gone: nothing left to free
            log.warning("replica %s: KV store unreachable at stop: %r", self.replica_id, e)
        pipe = self.r.pipeline(transaction=False)
        for rid, n in self.counts.items():
            log.warning("failed: still running when the drain timed out", extra=log_rid(rid))
            publish(pipe, self.keys, rid, TokenEvent((), n, error="server shutting down"))
            self.store.free.remote(rid)
        for rid, (_, rec) in self.pulling.items():  # its pull frees what it got on failure
            publish(pipe, self.keys, rid, TokenEvent((), len(rec.output_token_ids),
                                                     error="server shutting down"))
        pipe.execute()
        self.counts.clear()
        self.pulling.clear()
        self.r.hdel(self.keys.replicas, self.replica_id)
        try:
            ray.get(self.worker.stop.remote(), timeout=WORKER_STOP_S)
        except Exception as e:  # the worker may be gone; the arena must still go
            log.warning("replica %s: prefetch worker did not stop cleanly: %r",
                        self.replica_id, e)
        self._pubsub.close()
        self.arena.close()  # idempotent

    def _pair_threads(self, cfg: ServeConfig) -> int:
        """ServeConfig.pair_threads, else this node's Ray CPUs when one replica runs."""
        if cfg.pair_threads is not None:
            return cfg.pair_threads
        if cfg.num_replicas > 1:
            return max(cfg.replica_threads, cfg.worker_threads)
        node = next((n for n in ray.nodes() if n["NodeID"] == self.node), None)
        cpus = int(node["Resources"].get("CPU", 1)) if node else 1
        return max(cpus, cfg.replica_threads, cfg.worker_threads)

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        # torch's OpenMP thread count is per thread: `cores` sets it on this thread before
        # each step (Ray starts actors with OMP_NUM_THREADS=1, which new threads inherit).
        try:
            while not self._stop.is_set():
                # Messages first: work announced after this is still unread when the loop
                # idles, and ends its wait.
                self._read_messages()
                if not self._draining.is_set():
                    self._pull_inbox()
                    if self.cfg.replica_prefills:
                        self._claim_prefill()
                if self.pulling:
                    self._finish_pulls()
                q = self.transfers
                copied = q.poll()
                self.host.flush(q.submitted, copied)  # frees whose copies have all run
                if self.engine.has_unfinished():
                    self.cores.before_step()  # our turn (alternate), threads as CoreShare says
                    self._step()
                    self.cores.after_step()
                else:
                    self.cores.set_busy(False)
                    self._publish_state()
                    moving = self.pulling or copied < q.submitted
                    self._read_messages(wait=_BUSY_WAIT_S if moving else _IDLE_WAIT_S)
        except BaseException as e:
            log.exception("replica %s: decode loop failed", self.replica_id)
            self._fail(e)
            raise

    def _pull_inbox(self) -> None:
        rids = [x.decode() for x in self.r.lpop(self.keys.inbox(self.replica_id), 256) or ()
                if x.decode() not in self.counts and x.decode() not in self.pulling]
        # (a retried push may repeat an id)
        if not rids:
            return
        records = load_records(self.r, self.keys, rids)
        aborted = is_aborted(self.r, self.keys, [rec.request_id for rec in records])
        for rec, dead in zip(records, aborted, strict=True):
            if dead:
                log.info("aborted before decode; KV freed", extra=log_rid(rec.request_id))
                self.store.free.remote(rec.request_id)
                continue
            log.debug("assigned: kv_len %d", rec.kv_len, extra=log_rid(rec.request_id))
            if rec.node and rec.node != self.node:  # prefilled on another node
                self.pulling[rec.request_id] = (self.worker.pull_remote.remote(
                    rec.request_id, rec.node, len(rec.slots)), rec)
            else:
                self._add(rec, list(rec.slots))

    def _claim_prefill(self) -> None:
        """prefill_on=replica: take prompts off the prefill queue into this engine (FCFS),
        about a step's worth beyond those still waiting for their first token, as a
        prefetch worker does; the rest stays in the global queue, where admission control
        sees it. This replica becomes their holder."""
        now = time.monotonic()
        if now - self._cordon_at > _CORDON_EVERY_S:
            self._cordon_at = now
            self._cordoned = self.node in cordoned(self.r, self.keys, "prefill")
        room = min(self._claim_window - len(self.prefilling), self._room())
        if room <= 0 or self._cordoned:
            return
        rids = claim_prefill(self.r, self.keys, self.replica_id, room)
        for rec in admit_claimed(self.engine, self.r, self.keys, rids, self._kept):
            self.metrics.record_queue_time(max(0.0, time.time() - rec.arrival_time))
            self.counts[rec.request_id] = len(rec.output_token_ids)
            self.prefilling.add(rec.request_id)

    def _add(self, rec: RequestRecord, slots: list[int]) -> None:
        self.metrics.record_queue_time(max(0.0, time.time() - rec.arrival_time))
        self.engine.add_prefilled(rec.request_id, list(rec.prompt_token_ids), rec.params,
                                  list(rec.output_token_ids), slots, rec.arrival_time)
        self.counts[rec.request_id] = len(rec.output_token_ids)

    def _finish_pulls(self) -> None:
        """Requests whose cross-node pull returned join the pool (their KV is in this
        node's store now); those whose source store was gone go back to the prefill queue."""
        by_ref = {ref: rid for rid, (ref, _) in self.pulling.items()}
        done, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in done:
            rid = by_ref[ref]
            rec = self.pulling.pop(rid)[1]
            try:
                slots = ray.get(ref)
            except ray.exceptions.RayError as e:
                log.warning("KV on node %s unreachable (%s); recomputing", rec.node, e,
                            extra=log_rid(rid))
                if resume(self.r, self.keys, rid, self.replica_id, rec.output_token_ids):
                    self.r.hincrby(self.keys.counters, "resumed", 1)
                continue
            if is_aborted(self.r, self.keys, [rid])[0]:
                log.info("aborted while its KV moved; KV freed", extra=log_rid(rid))
                self.store.free.remote(rid)
                continue
            self._add(rec, slots)

    def _read_messages(self, wait: float = 0.0) -> None:
        """Read the pub/sub messages: abort what the abort channel names; a work-channel
        message only ends the wait. `wait`: block up to this long for the first message
        (an idle loop)."""
        while (msg := self._pubsub.get_message(timeout=wait)) is not None:
            wait = 0.0
            if msg["channel"].decode() != self.keys.abort_channel:
                continue  # work: the loop looks at its inbox and the prefill queue next
            # "rid", or "rid@holder": only that holder aborts (a request resumed elsewhere
            # after this replica was taken for dead)
            rid, _, holder = msg["data"].decode().partition("@")
            if holder and rid in self._kept:  # claimed back before this abort came
                self._kept.discard(rid)
                continue
            if rid in self.counts and holder in ("", self.replica_id):
                log.info("aborted after %d tokens", self.counts[rid], extra=log_rid(rid))
                self.engine.abort(rid)
                self.counts.pop(rid, None)
                self.prefilling.discard(rid)

    def _step(self) -> None:
        out = self.engine.step()
        finished = {o.request_id: o for o in out.finished}
        if out.sampled:
            pipe = self.r.pipeline(transaction=False)
            for rid, tok in out.sampled.items():
                self.prefilling.discard(rid)
                n = self.counts[rid] = self.counts[rid] + 1
                lp = out.logprobs.get(rid)
                reason = finished[rid].finish_reason if rid in finished else None
                publish(pipe, self.keys, rid, TokenEvent(
                    (tok,), n, reason, (lp,) if lp is not None else None))
                if reason is not None:
                    log.debug("finished (%s) after %d tokens", reason, n, extra=log_rid(rid))
                    del self.counts[rid]
            pipe.execute()
        self._record_metrics()
        self._publish_state()

    def _record_metrics(self) -> None:
        st, q = self.engine.scheduler.stats(), self.transfers
        self.metrics.record_step(
            running=st.running, waiting=st.pooled + st.waiting,
            kv_usage=st.device_usage, host_kv_usage=1 - self.host.num_free /
            self.host.num_blocks, batch_kv_lengths=list(st.batch_kv_lengths),
            switches=st.counters["switches"], preemptions=st.counters["preemptions"],
            prefetch_bytes=q.stats.bytes, hits=q.hits, misses=q.misses)
