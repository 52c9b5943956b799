"""Smoke tests of the cross-node vs same-node KV pull benchmark: a tiny synthetic block, a
complete results file, every copy verified. No timing assertions (CI machines are shared)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from alignedserve.engine.config import EngineConfig, preferred_dtype
from alignedserve.kv_store.core import KVStoreCore
from alignedserve.kv_store.shm_arena import PREFIX
from alignedserve.loadgen.kv_pull_bench import (
    KVPullBenchConfig,
    main,
    model_layout,
    verify_and_release,
)

SHAPE = (2, 2, 16, 2, 8)  # [layers, K|V, block_size, kv_heads, head_dim]: 4 KiB fp32 blocks


def test_cli_writes_verified_results(tmp_path, capsys):
    out = tmp_path / "kv-pull"
    arenas_before = set(Path("/dev/shm").glob(f"{PREFIX}kv-pull-*"))
    assert main(["--block-shape", ",".join(map(str, SHAPE)), "--lengths", "40",
                 "--repeats", "2", "--warmup", "1", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 10_000
    assert data["benchmark"] == "kv-pull" and "loopback" in data["note"]
    assert data["command"].startswith("python -m alignedserve.loadgen.kv_pull_bench ")
    assert data["machine"]["cores"] >= 1
    assert data["layouts"] == {"synthetic": {
        "block_shape": list(SHAPE), "dtype": "float32", "block_bytes": 4096, "max_tokens": None,
        "skipped_lengths": []}}
    [p] = data["points"]
    assert (p["model"], p["kv_tokens"], p["blocks"], p["bytes"]) == ("synthetic", 40, 3, 3 * 4096)
    assert p["verified_copies"] == 2 * (1 + 2)  # both paths, warm-up and timed copies
    for route in ("cross", "same"):
        q = p[f"{route}_ms"]
        assert len(p["samples_ms"][route]) == 2
        assert 0 < q["p50"] <= q["p90"]
        assert p[f"{route}_gbps"] > 0
    assert p["added_ms"] == pytest.approx(p["cross_ms"]["p50"] - p["same_ms"]["p50"])
    assert p["link_ms"] == pytest.approx({"25 GB/s": 3 * 4096 / 25e6,
                                          "12.5 GB/s": 3 * 4096 / 12.5e6})
    table = capsys.readouterr().out
    assert "| synthetic | 40 |" in table and "loopback" in table
    assert set(Path("/dev/shm").glob(f"{PREFIX}kv-pull-*")) <= arenas_before  # both removed


def test_a_wrong_copy_is_caught_and_freed_slots_are_poisoned():
    core = KVStoreCore(f"{PREFIX}kv-pull-test-{uuid.uuid4().hex[:8]}", 4, SHAPE,
                       torch.float32)
    try:
        data = torch.randn(2, *SHAPE)
        slots = core.allocate("r", 2)
        assert slots is not None
        core.write("r", [0, 1], data)
        with pytest.raises(RuntimeError, match="differ from the source"):
            verify_and_release(core, "r", slots, data + 1, "test")
        verify_and_release(core, "r", slots, data, "test")
        assert core.blocks("r") == []
        assert torch.isnan(core.arena.blocks[slots]).all()
    finally:
        core.close()


def test_config_wants_models_or_a_block_shape():
    with pytest.raises(ValueError, match="not both"):
        KVPullBenchConfig(models=("tiny",), block_shape=SHAPE)
    with pytest.raises(ValueError, match="not both"):
        KVPullBenchConfig(models=())
    with pytest.raises(ValueError, match="block_shape is"):
        KVPullBenchConfig(models=(), block_shape=(2, 16))


def test_smollm2_block_is_the_serving_paths(model_dirs):
    layout = model_layout(str(model_dirs("smollm2-135m")))
    # the serving default dtype is auto: bf16 where the CPU has native bf16 math
    want = torch.bfloat16 if preferred_dtype() == "bfloat16" else torch.float32
    block = EngineConfig.model_fields["block_size"].default
    assert layout.block_shape == (30, 2, block, 3, 64) and layout.dtype == want
    assert layout.block_bytes == 30 * 2 * block * 3 * 64 * want.itemsize
