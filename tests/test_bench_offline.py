"""Smoke tests of the offline benchmark and the `alignedserve` CLI on the tiny model.

Sane numbers and complete outputs only: no timing assertions (CI machines are shared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignedserve.cluster.cli import main
from alignedserve.loadgen.bench_offline import OfflineBenchConfig, run_offline_bench

# 6 short requests: len_scale 16 makes mix95 prompts 4..63 tokens, outputs 4..32; a small
# device KV pool (the default 1 GiB is zero-filled at start-up, seconds on these VMs).
SMALL = {"num_requests": 6, "len_scale": 16.0, "threads": 1, "progress": False,
         "kv_cache_gib": 0.1}
SMALL_HOST = ("host_kv_gib", 0.25)  # the aligned engine's host pool (default 4 GiB)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from alignedserve.model_zoo.model_builder import build_model

    return build_model("tiny", tmp_path_factory.mktemp("bench-models") / "tiny")


def test_offline_bench_all_systems(tiny_model, tmp_path):
    cfg = OfflineBenchConfig(model=str(tiny_model), out_dir=str(tmp_path / "out"),
                             aligned=(SMALL_HOST,), **SMALL)
    result = run_offline_bench(cfg)
    assert result.json_path.is_file() and result.png_path.stat().st_size > 10_000
    data = json.loads(result.json_path.read_text())
    assert list(data["systems"]) == ["fcfs", "hf-static", "hf-cb"]
    for name, s in data["systems"].items():
        assert s["error"] is None, (name, s["error"], s["notes"])
        assert s["completed"] == 6 and s["failed"] == 0
        assert s["generated_tokens"] == data["workload"]["output_tokens"]
        for metric in ("decode_tps", "output_tps", "total_tps", "wall_s"):
            assert s[metric] > 0, (name, metric)
        assert s["ttft_s"]["p50"] > 0 and s["e2e_s"]["p99"] >= s["ttft_s"]["p50"]
    # Greedy fp32 on the same weights: every system produces the same tokens.
    assert data["systems"]["hf-static"]["token_match_vs_fcfs"] == 1.0
    assert data["systems"]["hf-cb"]["token_match_vs_fcfs"] == 1.0
    fcfs = data["systems"]["fcfs"]
    assert fcfs["decode_tps_exact"] and fcfs["iteration_s"]["count"] > 0
    assert 0 <= fcfs["padding_pct"] < 100 and 0 < fcfs["batch_change_rate"] <= 1
    assert len(data["iteration_latencies_s"]["fcfs"]) == fcfs["iteration_s"]["count"]
    assert data["systems"]["hf-static"]["padding_pct"] > 0
    for ref in ("fcfs", "hf-static", "hf-cb"):
        others = set(data["systems"]) - {ref}
        assert set(data["ratios"][ref]) == others
        assert all(data["ratios"][ref][o]["decode_tps"] > 0 for o in others)
    hw = data["hardware"]
    assert hw["machine"]["copy_gbps"] > 0 and hw["machine"]["gemm_gflops"]["float32"] > 0
    bound = hw["decode_bound"]
    assert bound["mem_bw_fraction"] > 0 and bound["weight_bytes_read"] > 0
    assert bound["compute_bound_tps"] > 0
    assert data["equivalent_command"].startswith("alignedserve bench offline")


def test_cli_subprocess_and_failed_policy(tiny_model, tmp_path):
    """The CLI end to end; an unknown policy becomes an error entry, not a crash."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "alignedserve.cluster.cli", "bench", "offline",
           "--model", str(tiny_model), "--policies", "fcfs,no-such-policy", "--peers", "none",
           "--num-requests", "3", "--len-scale", "32", "--threads", "1", "--no-hw-probe",
           "--kv-cache-gib", "0.1",
           "--no-progress", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert (out / "results.png").is_file()
    assert data["systems"]["fcfs"]["completed"] == 3
    assert data["systems"]["no-such-policy"]["error"]
    assert data["command"].startswith("alignedserve bench offline")
    assert data["hardware"] == {}


def test_cli_model_init(tmp_path, capsys):
    assert main(["model", "init", "tiny", "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert str(tmp_path / "m") in capsys.readouterr().out


def test_cli_rejects_bad_arguments(tiny_model, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "offline", "--model", "x", "--dtype", "float16"])
    assert main(["bench", "offline", "--model", str(tiny_model), "--workload", "nope",
                 "--peers", "none", "--no-hw-probe", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err


def test_step_microbenchmark_smoke(tiny_dir, tmp_path):
    import random

    from alignedserve.loadgen.bench_step import SPREADS, kv_lengths, run

    lens = kv_lengths("mix95-like", 20, 100, random.Random(0))
    assert len(lens) == 20 and max(lens) == 12 * min(lens)
    assert abs(sum(lens) / 20 - 100) < 10, "the mean KV length is preserved"
    points = run(str(tiny_dir), batch=4, mean_kv=24, steps=2, threads=1, out=tmp_path / "out")
    assert {(p.spread, p.backend) for p in points} == {
        (s, b) for s in SPREADS for b in ("dense", "varlen")}
    assert all(p.step_ms_p50 > 0 for p in points)
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    aligned_dense = next(p for p in points if p.spread == "aligned" and p.backend == "dense")
    assert aligned_dense.padding == 0.0


def test_aligned_vs_fcfs_online_arrivals(tiny_model, tmp_path):
    """Online mode submits on a Poisson schedule; the aligned policy reports its batch
    switches, KV copies and counters, and produces the baseline's tokens."""
    cfg = OfflineBenchConfig(model=str(tiny_model), out_dir=str(tmp_path / "on"),
                             policies=("aligned", "fcfs"), peers=(), rate=40.0,
                             hw_probe=False, aligned=(("min_batch", 2), SMALL_HOST), **SMALL)
    path = run_offline_bench(cfg).json_path
    data = json.loads(path.read_text())
    al, fc = data["systems"]["aligned"], data["systems"]["fcfs"]
    assert al["completed"] == fc["completed"] == 6
    assert fc["token_match_vs_aligned"] == 1.0
    assert 0 < al["switch_rate"] <= 1 and fc["switch_rate"] is None
    assert al["kv_transfer"]["stall_s"] >= 0 and al["scheduler"]["batches"] >= 1
    assert "--rate 40" in data["equivalent_command"] and "--min-batch=2" in data[
        "equivalent_command"]
    assert data["config"]["rate"] == 40.0
    from alignedserve.loadgen.bench_table import markdown

    md = markdown([path]).splitlines()
    assert md[0].startswith("| model |") and len(md) >= 4
    assert any("| **aligned** |" in line and "(online 40/s)" in line for line in md)


def test_online_mode_refuses_peers(tiny_model):
    with pytest.raises(ValueError, match="online"):
        OfflineBenchConfig(model=str(tiny_model), rate=5.0, peers=("hf-cb",))


def test_repeats_alternate_the_order_and_keep_every_round(tiny_model, tmp_path):
    """--repeats: rounds run A B, then B A; each round's ratio is taken within the round,
    and the table shows each policy's median round."""
    cfg = OfflineBenchConfig(model=str(tiny_model), out_dir=str(tmp_path / "rep"),
                             policies=("aligned", "fcfs"), peers=(), repeats=3,
                             aligned=(("align_by", "spread"), SMALL_HOST), hw_probe=False, **SMALL)
    data = json.loads(run_offline_bench(cfg).json_path.read_text())
    rounds = data["rounds"]
    assert [r["order"] for r in rounds] == [["aligned", "fcfs"], ["fcfs", "aligned"],
                                            ["aligned", "fcfs"]]
    for r in rounds:
        fcfs, aligned = r["systems"]["fcfs"], r["systems"]["aligned"]
        assert fcfs["decode_vs_aligned"] == pytest.approx(
            fcfs["decode_tps"] / aligned["decode_tps"])
    for name in ("aligned", "fcfs"):  # the shown run is the median round
        per_round = sorted(r["systems"][name]["decode_tps"] for r in rounds)
        assert data["systems"][name]["decode_tps"] == pytest.approx(per_round[1])
    assert "--repeats 3" in data["equivalent_command"]
    assert "--align-by=spread" in data["equivalent_command"]
