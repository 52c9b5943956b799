"""What the cluster knows about its nodes, kept in Redis: each node's KV store (where other
nodes reach it over gRPC, and how full it is) and the stages an operator cordoned off a
node.

A compute replica publishes its node's `StoreInfo` about once a second; a prefetch worker
that must pull a request's KV from another node looks the address up here (not through Ray,
whose view of a node that just died lags by many seconds: a refused connection is immediate).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal, get_args

import redis

from alignedserve.global_queue.keys import RedisKeys

Stage = Literal["decode", "prefill", "all"]
STAGES: tuple[str, ...] = get_args(Stage)


@dataclass(frozen=True)
class StoreInfo:
    """One node's KV store, as its replicas last saw it."""

    node: str  # Ray node id
    address: str  # host:port of its gRPC service (other nodes pull KV from it)
    ts: float  # time.time() seconds when published
    num_blocks: int = 0
    used_blocks: int = 0
    num_requests: int = 0  # request ids holding blocks
    bytes_served: int = 0  # KV bytes other nodes read from it over gRPC

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> StoreInfo:
        return cls(**json.loads(raw))


def publish_store(client: redis.Redis, keys: RedisKeys, info: StoreInfo) -> None:
    client.hset(keys.stores, info.node, info.to_json())


def load_stores(client: redis.Redis, keys: RedisKeys) -> list[StoreInfo]:
    return [StoreInfo.from_json(v) for v in client.hgetall(keys.stores).values()]


def store_address(client: redis.Redis, keys: RedisKeys, node: str) -> str | None:
    raw = client.hget(keys.stores, node)
    return StoreInfo.from_json(raw).address if raw is not None else None


def cordon(client: redis.Redis, keys: RedisKeys, node: str, stage: Stage) -> None:
    """Keep `stage` off `node`: "decode" (the leader assigns its replicas nothing new; what
    its workers prefill decodes on other nodes, its KV pulled over gRPC), "prefill" (its
    workers claim no new prompts), or "all". Work already there finishes."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    client.hset(keys.cordon, node, stage)


def uncordon(client: redis.Redis, keys: RedisKeys, node: str) -> bool:
    return bool(client.hdel(keys.cordon, node))


def cordoned(client: redis.Redis, keys: RedisKeys, stage: Literal["decode", "prefill"]
             ) -> set[str]:
    """Nodes on which `stage` is cordoned."""
    return {n.decode() for n, s in client.hgetall(keys.cordon).items()
            if s.decode() in (stage, "all")}
