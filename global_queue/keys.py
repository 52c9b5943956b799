"""Redis key names of one deployment (prefix `p`, default "alignedserve:").

    p req:{id}        hash   the request record (`RequestRecord`)
    p prefill         list   request ids waiting for prefill, FCFS (router RPUSH, worker LPOP)
    p decode          zset   prefilled request ids scored by KV length (`RedisQueueIndex`)
    p decode:arrival  zset   the same ids scored by arrival time (the starvation clocks)
    p admitting       zset   ids admitted by a router but not yet queued, scored by the
                             time (the admission bound counts them; `records.admit`)
    p seq             string counter giving index ties their insertion order
    p inbox:{replica} list   request ids the leader assigned to a compute replica
    p tok:{id}        stream token events of one request (`TokenEvent`; replica/worker XADD)
    p aborted         set    ids a client abandoned; every stage checks it at hand-off
    p abort           pubsub ids to abort now (compute replicas listen)
    p work            pubsub new work: a prompt queued for prefill, ids put in an inbox (an
                             idle compute replica or prefetch worker waits on it)
    p replicas        hash   replica id -> `ReplicaState` JSON, refreshed every loop
    p leader          string the scheduler leader's lock (token, with a TTL)
    p counters        hash   deployment-wide event counts (e.g. `resumed`), for status
    p routers         hash   router id -> last heartbeat (time.time()), from its leader loop
    p routed:{router} set    ids of the open requests whose client is on that router
    p stores          hash   node id -> `StoreInfo` JSON (its KV store's gRPC address, usage)
    p cordon          hash   node id -> stage ("decode", "prefill" or "all") kept off it
    p wake            list   at most one token: something for the leader to dispatch (an
                             index insert, a replica's new state); it waits on it (BLPOP)

Ownership: a request is held by exactly one stage at a time (prefill queue, a prefetch
worker, the decode index, the leader in transit, a compute replica); the record's `holder`
names the process. The holder frees its KV when it sees the request aborted; removal from a
Redis structure (LPOP, ZREM) is what moves ownership, so two stages never both hold it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "alignedserve:"

    def req(self, rid: str) -> str:
        return f"{self.prefix}req:{rid}"

    def tok(self, rid: str) -> str:
        return f"{self.prefix}tok:{rid}"

    def inbox(self, replica: str) -> str:
        return f"{self.prefix}inbox:{replica}"

    def routed(self, router: str) -> str:
        return f"{self.prefix}routed:{router}"

    @property
    def routers(self) -> str:
        return f"{self.prefix}routers"

    @property
    def prefill(self) -> str:
        return f"{self.prefix}prefill"

    @property
    def decode(self) -> str:
        return f"{self.prefix}decode"

    @property
    def decode_arrival(self) -> str:
        return f"{self.prefix}decode:arrival"

    @property
    def admitting(self) -> str:
        return f"{self.prefix}admitting"

    @property
    def seq(self) -> str:
        return f"{self.prefix}seq"

    @property
    def aborted(self) -> str:
        return f"{self.prefix}aborted"

    @property
    def abort_channel(self) -> str:
        return f"{self.prefix}abort"

    @property
    def work_channel(self) -> str:
        return f"{self.prefix}work"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}replicas"

    @property
    def leader(self) -> str:
        return f"{self.prefix}leader"

    @property
    def stores(self) -> str:
        return f"{self.prefix}stores"

    @property
    def cordon(self) -> str:
        return f"{self.prefix}cordon"

    @property
    def counters(self) -> str:
        return f"{self.prefix}counters"

    @property
    def wake(self) -> str:
        return f"{self.prefix}wake"

    def owned(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(exact keys, glob patterns) of every key this layout uses: what a deployment
        owns, without matching a longer prefix that merely starts with this one."""
        exact = (self.prefill, self.decode, self.decode_arrival, self.admitting, self.seq,
                 self.aborted, self.replicas, self.leader, self.counters, self.routers,
                 self.stores, self.cordon, self.wake)
        return exact, (self.req("*"), self.tok("*"), self.inbox("*"), self.routed("*"))
