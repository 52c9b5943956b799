"""Typed configuration of a serving deployment.

Sources, highest precedence first: `alignedserve serve` flags, environment variables
(`ALIGNEDSERVE_<FIELD>`, e.g. `ALIGNEDSERVE_HTTP_PORT=8001`; nested engine knobs as
`ALIGNEDSERVE_ENGINE__MIN_BATCH=16`), a YAML file (`--config F`), then the defaults below.
Environment variables are read once, when the config is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from alignedserve.engine.config import preferred_dtype
from alignedserve.scheduling.aligned_config import AlignedKnobs


class EngineKnobs(AlignedKnobs):
    """Engine knobs of the compute replicas (`EngineConfig` documents each in full); the
    aligned batching knobs are inherited from `AlignedKnobs`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["aligned"] = Field(
        "aligned", description="The cluster runs the aligned policy: prefilled KV lives in the "
        "KV store and replicas swap it in. The fcfs baseline runs in-process "
        "(`alignedserve bench`).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", validate_default=True, description="auto: bfloat16 on CPUs with native bf16 "
        "math (AVX512-BF16, AMX), else float32; resolved where the config is built, so the "
        "routers, replicas and KV stores agree.")

    @field_validator("dtype", mode="after")
    @classmethod
    def _resolve_dtype(cls, value: str) -> str:
        return preferred_dtype() if value == "auto" else value

    # 2 GiB: 46k fp32 SmolLM2 tokens, room for max_num_seqs requests of ~700 tokens (0.5 held
    # fewer tokens than 64 random 128/64 requests reach; vLLM's CPU default is 4 GiB).
    kv_cache_gib: float = Field(2.0, gt=0, description="Device KV pool per compute replica.")
    max_num_seqs: int = Field(64, ge=1, description="Requests per decode step at most.")
    max_num_batched_tokens: int = Field(1024, ge=16, description="Tokens per step at most.")
    max_model_len: int | None = Field(None, ge=2, description="Context length cap.")
    prefill_attention: Literal["auto", "kernel", "sdpa"] = Field(
        "auto", description="Prefill attention of the replicas and workers: the paged C++ "
        "kernel, torch's SDPA, or auto (the kernel, except bf16 on CPUs with AMX: SDPA).")


class ServeConfig(BaseSettings):
    """One AlignedServe deployment: where it listens, its topology and its engine."""

    model_config = SettingsConfigDict(env_prefix="ALIGNEDSERVE_", env_nested_delimiter="__",
                                      frozen=True, extra="forbid")

    model: str = Field("smollm2-135m", description="Model folder, or a built-in model name "
                       "(prepared on first use).")
    served_model_name: str | None = Field(None, description="Name clients pass as `model`; "
                                          "default: the model argument's basename.")
    host: str = Field("127.0.0.1", description="HTTP and gRPC bind address.")
    http_port: int = Field(8000, ge=1, le=65535, description="OpenAI HTTP port.")
    grpc_port: int = Field(9000, ge=0, le=65535, description="gRPC port (0 disables gRPC).")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="The global queue's Redis.")
    redis_prefix: str = Field("alignedserve:", description="Key prefix in Redis; one per app.")
    start_redis: bool = Field(True, description="Start a local redis-server on the URL's "
                              "loopback port when none answers.")
    ray_address: str | None = Field(None, description="Join this Ray cluster; None starts a "
                                    "local one.")
    kv_grpc_host: str | None = Field(None, description="Address each node's KV store serves "
                                     "gRPC on, for other nodes' cross-node KV pulls. None: "
                                     "the node's own address as Ray knows it (127.0.0.1 when "
                                     "`serve` starts a local cluster); never all interfaces "
                                     "unless set to 0.0.0.0.")
    kv_grpc_port: int = Field(0, ge=0, le=65535, description="Port of each node's KV store "
                              "gRPC service; 0 picks a free one (addresses are published in "
                              "Redis, so other nodes find it either way). Fix it where a "
                              "firewall or a Kubernetes Service must name it.")
    replica_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each compute replica (and so "
        "its prefetch worker's node) needs, e.g. {\"alignedserve_decode\": 1} to place "
        "replicas only on worker nodes started with that resource.")
    router_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each router needs, e.g. "
        "{\"node:__internal_head__\": 0.01} to keep routers on the head node.")
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        "HeadOnly", description="Where Serve runs its HTTP/gRPC proxies: on the head node only, "
        "or on every node (each then binds host:http_port on its own node).")
    ingress: Literal["auto", "direct", "proxy"] = Field(
        "auto", description="On the Ray that `serve` starts (a joined cluster's own settings "
        "decide there): `direct` has the router replica itself listen on host:http_port and "
        "grpc_port (Serve's direct ingress), so tokens skip the hop through Serve's proxy "
        "actor, which took 40% of the serving processes' CPU on a 2-core node (BENCHMARKS.md, "
        "issue 12); Serve's proxy still runs, on free ports. It needs num_routers 1, and a "
        "router restart refuses connections until it is back. `proxy`: clients talk to "
        "Serve's proxy, which fails over between routers. `auto`: direct with one router, "
        "else proxy.")

    num_replicas: int = Field(1, ge=1, description="Compute replicas (each gets a paired "
                              "prefetch worker).")
    num_routers: int = Field(1, ge=1, description="Router replicas (one is the scheduler "
                             "leader at a time).")
    replica_cpus: float = Field(0.5, ge=0, description="Ray CPUs a compute replica reserves.")
    worker_cpus: float = Field(0.5, ge=0, description="Ray CPUs a prefetch worker reserves.")
    router_cpus: float = Field(0.1, ge=0, description="Ray CPUs a router reserves.")
    replica_gpus: float = Field(0, ge=0, description="GPUs a compute replica reserves (0 on "
                                "CPU-only nodes; the CUDA path is not exercised in CI).")
    worker_gpus: float = Field(0, ge=0, description="GPUs a prefetch worker reserves (the "
                               "paper's prefetch GPU; 0 on CPU-only nodes).")
    replica_threads: int = Field(1, ge=1, description="torch threads of a compute replica.")
    worker_threads: int = Field(1, ge=1, description="torch threads of a prefetch worker.")
    pair_threads: int | None = Field(None, ge=1, description="torch threads a compute replica "
                                     "(or its prefetch worker) takes while the other side is "
                                     "idle: the replica in the decode tail with no prompt to "
                                     "prefill, the worker in a burst with nothing to decode. "
                                     "None: the node's Ray CPUs when one replica runs, else no "
                                     "sharing (replica_threads / worker_threads always).")
    core_sharing: Literal["split", "alternate"] = Field(
        "split", description="While a compute replica and its prefetch worker are both "
        "busy: `split` runs both at once on replica_threads / worker_threads; `alternate` "
        "takes turns, one step each on pair_threads (prefill and decode steps interleave on "
        "the whole node, as a colocated engine's would: lower TTFT, but lower throughput "
        "and higher TPOT on 2 cores, BENCHMARKS.md).")
    compute_nice: int | None = Field(
        None, ge=-20, le=19, description="Niceness of the threads that run model steps in "
        "compute replicas and prefetch workers, and of every thread of the routers. Ray "
        "starts workers at nice 15, below Redis and Ray's own daemons, and every preemption "
        "of one thread stalls a multi-threaded step; 0 speeds steps up on small nodes. The "
        "routers follow, so admission and token streaming do not wait behind the steps "
        "(Serve's proxy, which carries tokens only with ingress `proxy`, stays at 15). "
        "Lowering it needs CAP_SYS_NICE (root on a host; add the capability in a "
        "container), else Ray's is kept with a warning. None: keep Ray's.")
    prefill_on: Literal["auto", "worker", "replica"] = Field(
        "auto", description="Who runs prefill. `worker`: each compute replica's prefetch "
        "worker (the paper's design: prefilled KV goes through the KV store and the decode "
        "index to any replica). `replica`: each compute replica claims prompts from the "
        "prefill queue itself and mixes their chunks into its decode steps, on all its "
        "threads (a colocated engine, as vLLM runs; the worker then only moves KV). `auto`: "
        "`replica` when one CPU replica serves the app (a small node, where a worker's "
        "prefill and the replica's decode would split its few cores), else `worker`.")
    host_kv_gib: float = Field(2.0, gt=0, description="KV store (host pool) size per node.")
    prefill_token_budget: int = Field(1024, ge=16, description="Prefill tokens per worker step.")
    prefill_chunk_tokens: int | None = Field(256, ge=1, description="A prompt already in "
                                             "prefill takes at most this many tokens of a "
                                             "worker step, so a new request's first chunk "
                                             "does not wait behind long prompts "
                                             "(`long_prefill_token_threshold`); None: no cap.")
    replica_inflight: int = Field(256, ge=1, description="Requests the leader keeps assigned "
                                  "to each compute replica (its local pool to batch from).")
    leader_ttl_s: float = Field(3.0, gt=0, description="Scheduler leader lock TTL; a new "
                                "leader takes over this long after the old one dies.")
    replica_timeout_s: float = Field(30.0, gt=0, description="A compute replica (or its "
                                     "prefetch worker) silent this long is taken as dead "
                                     "even if Ray still reports it alive (a hung process). "
                                     "A replica Ray reports dead is acted on within ~2 s: "
                                     "its requests resume on a live replica.")
    redis_outage_s: float = Field(60.0, ge=0, description="How long replicas, workers and "
                                  "routers wait for Redis to come back (it is restarted if "
                                  "it dies) before failing what they hold; new requests get "
                                  "503 with Retry-After meanwhile.")
    drain_timeout_s: float = Field(20.0, ge=0, description="On shutdown, in-flight requests "
                                   "get this long to finish.")
    api_key: SecretStr | None = Field(None, description="Require `Authorization: Bearer "
                                      "<key>` on the OpenAI routes and gRPC calls (401 / "
                                      "UNAUTHENTICATED otherwise); /health and /metrics stay "
                                      "open. Set it through ALIGNEDSERVE_API_KEY or a secret, "
                                      "not on a command line others can read.")
    max_queued_requests: int | None = Field(None, ge=1, description="Requests waiting for "
                                            "prefill or dispatch at most; beyond it new "
                                            "requests get HTTP 429 / RESOURCE_EXHAUSTED with "
                                            "Retry-After. None: the host KV pool's tokens / "
                                            "256, at least 256.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the serving processes' logs (request id on every line; "
        "prompts and outputs are never logged at INFO or above).")
    engine: EngineKnobs = Field(default_factory=EngineKnobs)

    @model_validator(mode="after")
    def _one_router_when_direct(self) -> ServeConfig:
        if self.ingress == "direct" and self.num_routers != 1:
            raise ValueError(f"ingress=direct serves from the router replica on one port: "
                             f"num_routers must be 1, not {self.num_routers} (or set "
                             "ingress to proxy or auto)")
        return self

    @property
    def direct_ingress(self) -> bool:
        """Whether a Ray that `serve` starts serves through the router directly."""
        return self.ingress == "direct" or (self.ingress == "auto" and self.num_routers == 1)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @property
    def replica_prefills(self) -> bool:
        """`prefill_on` resolved: True when compute replicas run prefill themselves."""
        if self.prefill_on == "auto":
            return self.num_replicas == 1 and self.replica_gpus == 0
        return self.prefill_on == "replica"


def load_config(path: str | Path | None = None, **flags: Any) -> ServeConfig:
    """Flags (None values ignored) > environment > YAML file `path` > defaults."""
    yaml_file = Path(path) if path is not None else None
    if yaml_file is not None and not yaml_file.is_file():
        raise FileNotFoundError(f"config file {yaml_file} does not exist")

    class _Sources(ServeConfig):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                       dotenv_settings, file_secret_settings):
            if yaml_file is None:
                return init_settings, env_settings
            return init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file)

    try:
        loaded = _Sources(**{k: v for k, v in flags.items() if v is not None})
    except yaml.YAMLError as e:
        raise ValueError(f"{yaml_file}: not valid YAML: {e}") from e
    return ServeConfig.model_validate(loaded.model_dump())
