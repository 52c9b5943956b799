"""The simulator: the very policy classes, determinism, baselines, dispatch and nodes (the
cost model by hand: test_sim_cost_model.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignedserve.sim import cluster
from alignedserve.sim.cluster import SimPair
from alignedserve.sim.config import SimConfig
from alignedserve.sim.cost_model import CostModel, hardware, model
from alignedserve.sim.router import simulate
from alignedserve.sim.run import run_sim, system_config
from alignedserve.sim.workload import make_request, sim_workload


def test_the_simulator_drives_the_engines_own_policy_classes():
    from alignedserve.engine import llm_engine

    cost = CostModel(hardware("h100-sxm"), model("opt-2.7b"))
    aligned = SimPair(SimConfig(policy="aligned"), cost).scheduler
    fcfs = SimPair(SimConfig(policy="fcfs"), cost).scheduler
    assert type(aligned) is llm_engine.AlignedScheduler
    assert type(fcfs) is llm_engine.FCFSScheduler
    assert cluster.AlignedScheduler is llm_engine.AlignedScheduler


def small_workload(n: int = 60, seed: int = 0):
    return sim_workload("mix95", n, seed=seed, len_scale=4.0)


def test_small_cluster_completes_and_is_deterministic():
    wl = small_workload()
    cfg = SimConfig(model="opt-2.7b", pairs=2, min_batch=4)
    a, b = simulate(cfg, wl), simulate(cfg, wl)
    assert [(r.steps, r.end_s, r.tpot_s.tolist()) for r in a] == [
        (r.steps, r.end_s, r.tpot_s.tolist()) for r in b]
    assert sum(int((r.ttft_s >= 0).sum()) for r in a) == len(wl)
    assert all(r.end_s > 0 and math.isfinite(r.end_s) for r in a)


def test_run_sim_systems_and_gpu_parity():
    base = SimConfig(model="opt-2.7b", min_batch=4)
    assert system_config(base, "aligned", 8).pairs == 4
    assert system_config(base, "fcfs", 8).pairs == 8
    assert not system_config(base, "aligned-noprefetch", 8).prefetch
    res = run_sim(base, "mix95", 40, gpus=2, len_scale=4.0)
    for name, s in res.items():
        assert s["completed"] == 40, name
        assert s["decode_tps"] > 0 and s["tpot_p99_ms"] >= s["tpot_p50_ms"] > 0
    with pytest.raises(ValueError):
        system_config(base, "nope", 8)


def test_the_baselines_bracket_what_alignment_can_win():
    """fcfs-disagg and ceiling differ only in the straggler term, so the ceiling is never
    slower; the sorted queue admits shortest prompts first; disaggregated systems occupy a
    prefill device per decode device."""
    from alignedserve.sim.cluster import SortedFCFSScheduler, make_scheduler
    from alignedserve.sim.run import ALL_SYSTEMS

    base = SimConfig(model="opt-2.7b", min_batch=4, kernel="vllm")
    assert system_config(base, "fcfs-disagg", 8).gpus == 8
    assert system_config(base, "ceiling", 8, parity="compute").gpus == 16
    assert system_config(base, "ceiling", 8).kernel == "none"
    assert system_config(base, "fcfs-sorted", 8).gpus == 8
    res = run_sim(base, "mix95", 60, gpus=2, len_scale=4.0, systems=ALL_SYSTEMS)
    assert all(s["completed"] == 60 for s in res.values())
    assert res["ceiling"]["decode_tps"] >= res["fcfs-disagg"]["decode_tps"]
    assert res["ceiling"]["step_p50_ms"] <= res["fcfs-disagg"]["step_p50_ms"]
    assert res["ceiling"]["straggler_s"] == 0 < res["fcfs-disagg"]["straggler_s"]
    cfg = base.but(policy="fcfs-sorted")
    sched = make_scheduler(cfg, CostModel(hardware(cfg.hardware), model(cfg.model)))
    assert isinstance(sched, SortedFCFSScheduler)
    for k, n in enumerate([30, 10, 20, 10]):
        sched.add_request(make_request(k, n, 4, 0.0))
    assert [r.num_prompt_tokens for r in sched.waiting] == [10, 10, 20, 30]


def test_workload_shards_round_robin_and_keep_lengths():
    wl = sim_workload("sharegpt", 1000, seed=3, rate=50.0)
    assert (wl.prompt >= 16).all() and (wl.output >= 1).all()
    assert (wl.arrival[1:] >= wl.arrival[:-1]).all() and wl.arrival[-1] == pytest.approx(20, 0.2)
    shards = [wl.shard(p, 3) for p in range(3)]
    assert sum(len(s) for s in shards) == 1000 and shards[1].prompt[0] == wl.prompt[1]
    assert sim_workload("sharegpt", 1000, seed=3, rate=50.0).prompt.tolist() == wl.prompt.tolist()


def test_workers_give_the_same_results_and_gpus_count_prefetch_devices():
    wl = small_workload(40)
    cfg = SimConfig(model="opt-2.7b", pairs=4, min_batch=4)
    one, two = simulate(cfg, wl), simulate(cfg, wl, workers=2)
    assert [r.tpot_s.tolist() for r in one] == [r.tpot_s.tolist() for r in two]
    assert cfg.gpus == 8 and system_config(cfg, "fcfs", 8).gpus == 8
    assert system_config(cfg, "aligned", 8, parity="compute").gpus == 16


def test_planner_finds_the_smallest_count_meeting_the_slo():
    from alignedserve.sim.plan import PlanRequest, evaluate, smallest_pairs

    req = PlanRequest("opt-2.7b", "mix95", slo_tpot_ms=40.0, rate=40.0, len_scale=4.0,
                      per_pair=60, max_pairs=64)
    knobs = {"policy": "fcfs", "max_num_batched_tokens": 2048}
    best = smallest_pairs(req, knobs)
    assert best is not None and best.meets and best.gpus == best.pairs
    if best.pairs > 1:
        assert not evaluate(req, knobs, best.pairs - 1).meets
    tight = PlanRequest("opt-2.7b", "mix95", slo_tpot_ms=0.01, rate=40.0, len_scale=4.0,
                        per_pair=20, max_pairs=2)
    assert smallest_pairs(tight, knobs) is None  # no count reaches a 10 us TPOT


def test_dispatch_router_runs_the_deployed_global_policy():
    """router=dispatch: every request runs once, on the pair plan_dispatch chose; offline,
    each pair gets a length-aligned slice instead of a round-robin mix; deterministic."""
    wl = sim_workload("mix70", 120, seed=3, len_scale=4)
    cfg = SimConfig(model="opt-2.7b", pairs=3, min_batch=4, router="dispatch",
                    inflight_per_pair=40)
    first, again = simulate(cfg, wl), simulate(cfg, wl)
    assert sum(len(r.output) for r in first) == len(wl)
    assert sorted(int(x) for r in first for x in r.output) == sorted(wl.output.tolist())
    assert not any(np.isnan(r.ttft_s).any() for r in first)
    assert [r.end_s for r in first] == [r.end_s for r in again]
    # All 120 arrive at t=0 and 40 fit per pair: the first dispatch splits the queue into
    # KV-length windows: two pairs get dense windows, the last the leftovers of both ends.
    rr = simulate(cfg.but(router="round-robin"), wl)

    def spread(results) -> float:
        """Median over pairs of the prompt lengths' interquartile range."""
        return float(np.median([np.subtract(*np.percentile(r.prompt, [75, 25]))
                              for r in results]))

    assert spread(first) < 0.5 * spread(rr)


def test_online_capacity_is_the_edge_of_the_slo():
    from alignedserve.sim.plan import capacity
    from alignedserve.sim.router import run_pair
    from alignedserve.sim.run import summarize, system_config

    base = SimConfig(model="opt-2.7b", kernel="vllm")
    c = capacity(base, "fcfs", "mix95", slo_tpot_ms=40, num_requests=60, len_scale=0.5)
    assert c.rate > 0 and c.tpot_p99_ms <= 40 and c.per_gpu == c.rate
    cfg = system_config(base, "fcfs", 1, parity="compute")
    over = sim_workload("mix95", 60, len_scale=0.5, rate=4 * c.rate)
    s = summarize([run_pair(cfg, over)])
    keeps_up = s["makespan_s"] <= 1.5 * float(over.arrival[-1]) + 1.0
    assert not (keeps_up and s["tpot_p99_ms"] <= 40)  # 4x past the edge misses


def _dispatch_cfg(**changes: object) -> SimConfig:
    return SimConfig(model="opt-2.7b", pairs=4, min_batch=4, router="dispatch",
                     inflight_per_pair=40).but(**changes)


def test_one_node_dispatch_is_unchanged_whatever_the_network():
    """pairs_per_node >= pairs puts every pair on one node: no request moves, the network
    bandwidth is irrelevant and the results equal the default (node-less) run's."""
    wl = sim_workload("mix95", 150, seed=1, len_scale=4, rate=60.0)
    cfg = _dispatch_cfg(inflight_per_pair=12)
    base = simulate(cfg, wl)
    for ppn in (4, 64):
        res = simulate(cfg.but(pairs_per_node=ppn, internode_gbps=0.001), wl)
        assert cfg.but(pairs_per_node=ppn).nodes.count == 1
        for a, b in zip(base, res, strict=True):
            assert (a.steps, a.end_s) == (b.steps, b.end_s)
            assert np.array_equal(a.ttft_s, b.ttft_s) and np.array_equal(a.prompt, b.prompt)
            assert np.isnan(b.pull_s).all() and len(b.pull_s) == len(b.prompt)
            assert b.pull_bytes == 0
    # Round-robin shards: a pair prefills what it decodes, so nodes never matter.
    rr = simulate(cfg.but(router="round-robin", pairs_per_node=1), wl)
    assert all(np.isnan(r.pull_s).all() and len(r.pull_s) == len(r.prompt) for r in rr)


def test_cross_node_requests_pull_their_kv_over_the_link():
    """Every request prefilled on node 0 (pairs 0, 1 of 2 per node), all at t=0 and all
    fitting in one dispatch: node 1's pairs decode only pulled requests; the bytes are the
    pulled prompts' KV; node 1's inbound link serializes them, and a request joins a batch
    only after its KV landed. Node 0's pairs never see the network. (A pulled request is
    not always later than with an infinitely fast link: alone on a pair, it may get a
    smaller first step than in the crowd that lands all at once; on average it is.)"""
    from alignedserve.sim.router import simulate_dispatched
    from alignedserve.sim.run import summarize

    wl = sim_workload("mix70", 120, seed=3, len_scale=4)
    cfg = _dispatch_cfg(pairs_per_node=2, internode_gbps=25.0)
    home = np.arange(len(wl)) % 2  # prefetch workers of pairs 0 and 1 prefill everything
    slow = simulate_dispatched(cfg, wl, home)
    fast = simulate_dispatched(cfg.but(internode_gbps=float("inf")), wl, home)
    for res in (slow, fast):
        assert sorted(int(x) for r in res for x in r.output) == sorted(wl.output.tolist())
        assert not any(np.isnan(r.ttft_s).any() for r in res)
    per_token = model("opt-2.7b").kv_bytes_per_token
    pulled = [~np.isnan(r.pull_s) for r in slow]
    assert not pulled[0].any() and not pulled[1].any()
    assert pulled[2].all() and pulled[3].all() and len(slow[2].output) > 0
    for r, p in zip(slow, pulled, strict=True):
        assert r.pull_bytes == int(r.prompt[p].sum()) * per_token
        assert (r.ttft_s[p] >= r.pull_s[p]).all()  # arrival = dispatch = 0
    total = sum(r.pull_bytes for r in slow)
    last = max(float(r.pull_s[p].max()) for r, p in zip(slow, pulled, strict=True) if p.any())
    assert last == pytest.approx(total / 25e9)  # one link, back to back
    for a, b in zip(slow[:2], fast[:2], strict=True):
        assert a.end_s == b.end_s and np.array_equal(a.ttft_s, b.ttft_s)
    moved_slow = np.concatenate([r.ttft_s for r in slow[2:]])
    moved_fast = np.concatenate([r.ttft_s for r in fast[2:]])
    assert moved_slow.mean() > moved_fast.mean()
    assert all(r.pull_s[~np.isnan(r.pull_s)].max() == 0 for r in fast[2:])
    s = summarize(slow)
    assert s["cross_node"] == sum(int(p.sum()) for p in pulled)
    assert s["cross_node_gb"] == pytest.approx(total / 1e9)
    assert s["pull_mean_ms"] > 0


def test_no_request_moves_when_each_node_fills_its_own_pairs(capsys):
    """Round-robin prefill puts half the requests on each node and one dispatch fits them
    all, so each pair's share comes from its own node: where its node's aligned window is
    narrower than the share, the locality slack lets a pair take more local requests
    rather than top the share up with another node's (scheduling/dispatch.py)."""
    from alignedserve.sim.run import print_table, run_systems

    wl = sim_workload("mix70", 120, seed=3, len_scale=4)
    narrow = simulate(_dispatch_cfg(pairs_per_node=2), wl)
    assert sum(r.pull_bytes for r in narrow) == 0
    cfg = _dispatch_cfg(pairs_per_node=2, internode_gbps=1.0, slack_tokens=10**6)
    res = simulate(cfg, wl)
    assert sum(len(r.output) for r in res) == len(wl)
    assert all(np.isnan(r.pull_s).all() and r.pull_bytes == 0 for r in res)
    s = run_systems(cfg, wl, gpus=8, systems=("aligned",))["aligned"]
    assert (s["nodes"], s["cross_node"], s["cross_node_gb"]) == (2, 0, 0.0)
    print_table({"aligned": s}, "two nodes")
    assert "4 pairs on 2 nodes; 0 requests (0.0%) pulled" in capsys.readouterr().out


def test_internode_links_are_full_duplex_fifo_per_nic():
    from alignedserve.sim.nodes import InterNodeLinks, Nodes

    assert Nodes(5, 2).count == 3 and Nodes(5, 2).of_pair(4) == 2 and Nodes(5, None).count == 1
    links = InterNodeLinks(3, gbps=1.0, kv_bytes_per_token=1000)  # 1e6 tokens: 1 s
    a = links.pull(0, 1, 1_000_000, now=0.0)
    back = links.pull(1, 0, 1_000_000, now=0.0)  # the other direction of both NICs
    into = links.pull(2, 1, 500_000, now=0.0)  # node 1's inbound is busy until 1 s
    out = links.pull(0, 2, 500_000, now=0.5)  # node 0's outbound is busy until 1 s
    assert (a.landed, back.landed, into.landed, out.landed) == (1.0, 1.0, 1.5, 1.5)
    assert out.wait_s == 1.0 and into.nbytes == 500_000_000
    with pytest.raises(ValueError):
        links.pull(1, 1, 10, now=0.0)


def test_prefill_on_the_second_device_runs_beside_decode_not_in_lock_step():
    """A long prompt arriving while others decode: the disaggregated pair keeps decoding
    during its prefill (each decode step costs what its decodes cost), and the prompt's
    first token comes when the prefill device and the NVLink copy are done."""
    cost = CostModel(hardware("h100-sxm"), model("opt-13b"), "vllm")
    cfg = SimConfig(model="opt-13b", kernel="vllm").but(policy="fcfs", disagg=True)
    pair = SimPair(cfg, cost)
    pair.begin()
    for _ in range(4):
        pair.admit(100, 400, 0.0)
    for _ in range(5):  # their prefill, then decoding
        pair.step(None)
    pair.admit(6000, 4, pair.now)  # one long prompt: 6,000 tokens of prefill
    t0, steps0 = pair.now, len(pair._step_s)
    prefill = sum(cost.step([], [(s, min(8192, 6000 - s))]) for s in range(0, 6000, 8192))
    while math.isnan(pair._first[4]) or pair.now < pair._first[4]:
        pair.step(None)  # the first token's time is known once its last chunk is placed
    decode_only = pair._step_s[steps0:]
    assert len(decode_only) > 1, "decode went on while the prompt was prefilled"
    assert max(decode_only) < prefill / 2, "no decode step waited for the prefill"
    nvlink = cost.nvlink(6000 * cost.m.kv_bytes_per_token)
    assert pair._first[4] == pytest.approx(t0 + prefill + nvlink, rel=0.05)


def test_align_by_longest_lets_shorter_requests_ride_free():
    from alignedserve.scheduling.window_search import band_distance

    assert band_distance(100, 4000, 5000, 1.5, 0, by="spread") > 1
    assert band_distance(100, 4000, 5000, 1.5, 0, by="longest") == 0
    assert band_distance(9000, 4000, 5000, 1.5, 0, by="longest") == band_distance(
        9000, 4000, 5000, 1.5, 0, by="spread") > 0
    assert band_distance(9000, 4000, 5000, 1.5, 0, by="total") == 0
    # vLLM splits sequences past 8,192 tokens into partitions (no straggler): such a
    # request joins any band, and a band holding one takes any length.
    assert band_distance(9000, 400, 500, 1.5, 0, by="longest", split_above=8192) == 0
    assert band_distance(3000, 400, 9000, 1.5, 0, by="longest", split_above=8192) == 0
    assert band_distance(3000, 400, 500, 1.5, 0, by="longest", split_above=8192) > 0
    assert band_distance(9000, 400, 500, 1.5, 0, by="spread", split_above=8192) > 0
    from alignedserve.sim.cluster import make_scheduler

    def split_at(kernel: str) -> int | None:
        cfg = SimConfig(kernel=kernel)
        sched = make_scheduler(cfg, CostModel(hardware(cfg.hardware), model(cfg.model), kernel))
        return sched.cfg.split_above_tokens

    assert [split_at(k) for k in ("vllm", "v1", "split")] == [8192, None, None]
    assert SimConfig().kernel_align_by == "longest"  # the simulator models GPU kernels
    auto = SimConfig(align_by="auto")
    assert [auto.but(kernel=k).kernel_align_by for k in ("v1", "vllm", "split", "fluid")] == [
        "longest", "longest", "total", "total"]
    from alignedserve.scheduling.aligned_config import AlignedKnobs
    assert AlignedKnobs().align_by == "auto"  # the engine resolves it from its kernel
    from alignedserve.scheduling.dispatch import dispatch_align_by
    assert [dispatch_align_by("auto", g) for g in (0, 1)] == ["total", "spread"]
    assert dispatch_align_by("spread", 0) == "spread"
