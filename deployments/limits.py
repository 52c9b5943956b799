"""What every process of a deployment derives the same way from its `ServeConfig`: the
engine configuration of each role and the sizes they must agree on (the router validates
against them, the replica and the KV store allocate by them)."""

from __future__ import annotations

from dataclasses import dataclass

from alignedserve.config import ServeConfig
from alignedserve.engine.config import EngineConfig, ModelConfig
from alignedserve.engine.sizing import PoolSizes, pool_sizes

_TOKENS_PER_QUEUED = 256  # host-pool tokens per queued request when sizing the queue
_MIN_QUEUE = 256


def engine_config(cfg: ServeConfig, model_dir: str, threads: int, **over: object
                  ) -> EngineConfig:
    """The compute replica's engine config (`over` adapts it, e.g. the prefetch worker's)."""
    knobs = cfg.engine.model_dump()
    return EngineConfig(model=model_dir, num_threads=threads,
                        host_kv_gib=cfg.host_kv_gib, **{**knobs, **over})


@dataclass(frozen=True)
class ServingLimits:
    pools: PoolSizes  # a compute replica's device pool and the node's KV store
    max_model_len: int  # prompt + output tokens a request may have (both pools bound it)
    vocab_size: int
    max_queued_requests: int  # the admission bound (ServeConfig's, or sized from the pool)


def serving_limits(cfg: ServeConfig, model_dir: str) -> ServingLimits:
    ecfg = engine_config(cfg, model_dir, cfg.replica_threads)
    mcfg = ModelConfig.from_pretrained(model_dir)
    pools = pool_sizes(ecfg, mcfg)
    queued = cfg.max_queued_requests or max(
        _MIN_QUEUE, pools.host_blocks * ecfg.block_size // _TOKENS_PER_QUEUED)
    return ServingLimits(pools, pools.max_len_with_host, mcfg.vocab_size, queued)
