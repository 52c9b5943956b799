"""Shared fixtures: models are built once per session (random ones into a temp dir, the
real SmolLM2 into the user cache, converted once)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """name -> folder; builds lazily so each test pays only for the models it uses."""
    from alignedserve.model_zoo.model_builder import build_model, ensure_model

    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            if name == "smollm2-135m":
                built[name] = ensure_model(name)
            else:
                built[name] = build_model(name, root / name)
        return built[name]

    return get


# KV pools for in-process engines in tests: room for every test's requests on the small
# models, far below the engine's defaults (1 GiB device + 4 GiB host), which are zero-filled
# at start-up: on these VMs memory beyond the first few GiB costs seconds per GiB to touch.
SMALL_POOLS = {"kv_cache_gib": 0.1, "host_kv_gib": 0.25}


@pytest.fixture(scope="session")
def pools() -> dict[str, float]:
    return dict(SMALL_POOLS)


@pytest.fixture(scope="session")
def tiny_dir(model_dirs) -> Path:
    return model_dirs("tiny")


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on loopback for the session (started and stopped here)."""
    from alignedserve.global_queue.redis_server import LocalRedis
    from alignedserve.ports import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    srv = LocalRedis(url).start()
    yield url
    srv.stop()


@pytest.fixture
def r(redis_url):
    """A client of the session's redis-server."""
    import redis

    return redis.Redis.from_url(redis_url)


@pytest.fixture
def keys():
    """A key prefix of its own, so tests sharing the Redis never meet."""
    import uuid

    from alignedserve.global_queue.keys import RedisKeys

    return RedisKeys(f"test-{uuid.uuid4().hex[:8]}:")


@pytest.fixture(scope="session")
def helm() -> Path:
    """The pinned helm binary (`make tools` installs it into .tools/; installed here if not)."""
    from helm_chart import install_helm

    return install_helm()


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict[str, Any]]]:
    """The chart rendered with each ci/*.yaml values file, by file stem."""
    from helm_chart import CI_VALUES, docs_of

    assert {p.stem for p in CI_VALUES} >= {"defaults", "gpus", "external-redis",
                                           "monitoring-on"}
    return {p.stem: docs_of(helm, "-f", str(p)) for p in CI_VALUES}
