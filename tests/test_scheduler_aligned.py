"""Aligned policy driven by a fake executor that models KV contents block by block
(`aligned_harness`): any swap that loses, misplaces or races a block fails here."""

from __future__ import annotations

import random

import pytest
from aligned_harness import BS, FakeExecutor, expected

from alignedserve.scheduling.aligned import AlignedConfig, AlignedScheduler
from alignedserve.scheduling.block_manager import BlockAllocator, KVBlockManager
from alignedserve.scheduling.request import FinishReason, Request, RequestStatus
from alignedserve.scheduling.sampling_params import SamplingParams
from alignedserve.scheduling.window_search import band_distance


def make(rid: str, prompt_len: int, max_tokens: int = 6, arrival: float = 0.0) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, [5 + (i % 50) for i in range(prompt_len)], params, frozenset({2}),
                   arrival_time=arrival)


def sched(device_blocks: int = 256, host_blocks: int = 1024, **cfg) -> AlignedScheduler:
    cfg = {"max_batch": 8, "min_batch": 2, "max_num_batched_tokens": 64, "slack_tokens": 0,
           **cfg}
    return AlignedScheduler(KVBlockManager(device_blocks, BS, watermark=0.0),
                            BlockAllocator(host_blocks), AlignedConfig(**cfg))


def test_first_batch_is_the_densest_length_window():
    s = sched(max_batch=4, min_batch=3, max_spread=1.5)
    for i, n in enumerate([5, 40, 42, 44, 45, 90, 200]):
        s.add_request(make(f"r{i}", n))
    out = s.schedule()
    assert out.batch_switch
    assert sorted(r.request_id for r in s.running) == ["r1", "r2", "r3", "r4"]
    assert {c.request.request_id for c in out.chunks} <= {"r1", "r2", "r3", "r4"}
    assert len(s.pooled) == 3


def test_refill_takes_lengths_inside_the_band():
    s = sched(max_batch=3, min_batch=2, max_spread=1.5)
    reqs = [make("a", 20, 2), make("b", 22, 8), make("c", 24, 8), make("far", 100, 2),
            make("near", 21, 2)]
    for r in reqs:
        s.add_request(r)
    ex = FakeExecutor(s)
    ex.step()  # batch {a, near, b}: inside the band, shortest first
    first = {r.request_id for r in s.running}
    assert "far" not in first
    while "a" in s.requests:
        ex.step()
    assert "far" not in {r.request_id for r in s.running}, "far is outside the window"
    assert "far" in s.pooled


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_forced_swaps_keep_every_kv_block_exact(lag):
    """A device pool too small for the in-flight set: batches rotate through the host pool."""
    rng = random.Random(lag)
    s = sched(device_blocks=30, host_blocks=600, max_batch=4, min_batch=2, max_wait_steps=5,
              max_num_batched_tokens=32, lookahead_tokens=0)
    reqs = [make(f"r{i}", rng.choice([3, 9, 14, 30, 41]), rng.randint(8, 30))
            for i in range(24)]
    for r in reqs:
        s.add_request(r)
    ex = FakeExecutor(s, lag_steps=lag)
    outputs = ex.run()
    assert outputs == {r.request_id: expected(r) for r in reqs}
    assert s.swap.stats.swap_outs > 0 and s.swap.stats.swap_ins > 0, "no swaps were forced"
    assert s.stats().counters["switches"] > 1
    assert s.device.num_free_blocks == 30 and s.swap.host.num_free == 600, "blocks leaked"


def test_swap_out_writes_back_only_new_blocks():
    s = sched(device_blocks=64, host_blocks=64, max_batch=2, min_batch=1)
    r = make("r", 10, 20)
    s.add_request(r)
    ex = FakeExecutor(s, lag_steps=0)
    ex.step()  # prefill 10 tokens + first sample: 11 tokens, 10 with KV
    assert s.swap.swap_out(r) and s.swap.stats.blocks_out == 3  # positions 0..9: 3 blocks
    assert s.swap.swap_in(r)
    s.running = [r]
    ex.queue.extend((ex.step_no, t) for t in s.swap.drain())
    ex._complete(1 << 60)
    for _ in range(3):
        ex.step()  # 13 tokens of KV now: blocks 2 (partial before) and 3 are new
    assert s.swap.swap_out(r)
    assert s.swap.stats.blocks_out == 3 + 2, "only the partial block and the new one"


def test_starvation_bound_lets_an_outlier_in_after_a_bounded_number_of_steps():
    """A steady stream of short requests never makes room for one long request by length
    alone; the bound brings it in once it has waited max_wait_steps per band of distance
    (counted in engine steps), plus at most one short request's lifetime for a free slot."""
    horizon, short_life = 4, 31
    s = sched(max_batch=4, min_batch=2, max_spread=1.3, max_wait_steps=horizon,
              device_blocks=512, host_blocks=2048)
    ex = FakeExecutor(s)
    s.add_request(make("long", 120, 4))
    n, joined_at = 0, None
    for step in range(400):
        while len(s.pooled) + len(s.waiting) < 6:  # keep short peers plentiful
            s.add_request(make(f"s{n}", 10 + n % 3, short_life - 1))
            n += 1
        ex.step()
        if joined_at is None and s.requests.get("long") and s.requests["long"].status is (
                RequestStatus.RUNNING):
            joined_at = s.steps
        if "long" not in s.requests and step > 5:
            break
    farthest = band_distance(120, 10, 10, 1.3)  # the shorts' band never starts below 10
    assert joined_at is not None
    assert horizon <= joined_at <= farthest * horizon + short_life, (joined_at, farthest)
    assert s.stats().counters["starved"] >= 1


def test_without_pressure_the_outlier_waits_for_peers():
    """Control for the test above: before the bound, length order decides."""
    s = sched(max_batch=4, min_batch=2, max_spread=1.3, max_wait_steps=10**6)
    ex = FakeExecutor(s)
    s.add_request(make("long", 120, 4))
    for i in range(6):
        s.add_request(make(f"s{i}", 10, 30))
    for _ in range(10):
        ex.step()
    assert s.requests["long"].status is RequestStatus.WAITING


def _six_short_and_a_long(max_batch: int, align_by: str) -> tuple[AlignedScheduler, FakeExecutor]:
    s = sched(max_batch=max_batch, min_batch=2, max_spread=1.3, max_wait_steps=10**6,
              align_by=align_by)
    for i in range(6):
        s.add_request(make(f"s{i}", 10, 30))
    s.add_request(make("long", 120, 4))
    return s, FakeExecutor(s)


@pytest.mark.parametrize(("align_by", "long_waits"),
                         [("spread", True), ("total", False), ("longest", False)])
def test_a_long_request_waits_for_peers_only_where_that_pays(align_by, long_waits):
    """The same pool as the control above, with room for all of it. Under a kernel whose step
    costs the batch's total KV (align_by "total", the CPU engine's paged kernel) the long
    request takes a free slot at once, as under fcfs. Under per-sequence kernels ("longest")
    its straggler is paid whether it joins now or later, and the whole pool fits: it joins
    too. Under padded attention ("spread") it waits for its peers."""
    s, ex = _six_short_and_a_long(8, align_by)
    ex.step()
    assert (s.requests["long"].status is RequestStatus.WAITING) is long_waits
    assert len(s.running) == (6 if long_waits else 7)
    assert s.stats().counters["starved"] == 0  # joined at distance 0, or as all fit


@pytest.mark.parametrize("align_by", ["longest", "spread"])
def test_when_not_all_fit_the_band_decides_who_goes_first(align_by):
    s, ex = _six_short_and_a_long(4, align_by)
    for _ in range(5):
        ex.step()
    assert s.requests["long"].status is RequestStatus.WAITING


@pytest.mark.parametrize(("align_by", "first"), [("spread", ["b", "d"]), ("total", ["a", "b"])])
def test_a_burst_goes_shortest_first_only_where_length_costs(align_by, first):
    """A burst waits alike. Where misalignment costs the kernel, the shortest go first (more
    fit, the burst is swept short to long); under "total" arrival order decides, as fcfs,
    so no burst leaves its long prompts for a thin tail."""
    s = sched(max_batch=2, min_batch=1, max_spread=100.0, align_by=align_by)
    for rid, n in [("a", 40), ("b", 10), ("c", 30), ("d", 20)]:
        s.add_request(make(rid, n))
    s.schedule()
    assert sorted(r.request_id for r in s.running) == first


def test_align_by_auto_must_be_resolved_before_the_policy_runs():
    with pytest.raises(ValueError, match="auto"):
        AlignedConfig(align_by="auto")
    from alignedserve.scheduling.dispatch import DispatchKnobs

    with pytest.raises(ValueError, match="resolve auto"):
        DispatchKnobs(1.5, 0, 10.0, align_by="auto")


def test_a_burst_is_served_nearest_first_even_past_the_bound():
    """Requests of one burst age alike, so the bound never turns them into oldest-first:
    with every request overdue, the batch still takes the lengths nearest its band."""
    s = sched(max_batch=3, min_batch=1, max_spread=1.3, max_wait_steps=1,
              device_blocks=512, host_blocks=2048)
    ex = FakeExecutor(s)
    lengths = [100, 12, 400, 11, 13, 200, 10, 14]
    for i, n in enumerate(lengths):
        s.add_request(make(f"r{i}", n, 60))
    order = []
    for _ in range(200):
        before = {r.request_id for r in s.running}
        ex.step()
        order += [r.request_id for r in s.running if r.request_id not in before]
        if len(order) == len(lengths):
            break
    firsts = [lengths[int(rid[1:])] for rid in order[:5]]
    assert sorted(firsts) == [10, 11, 12, 13, 14], order


@pytest.mark.parametrize("running_long", [False, True])
def test_a_kernel_that_splits_long_members_gets_one_in_every_step(running_long):
    """Under vLLM's dispatch (V2 partitions once a member passes split_above_tokens) a step
    with one such member has no straggler for any member: when the batch has none, the
    shortest pooled request that long joins first, ahead of shorter ones."""
    s = sched(max_batch=3, min_batch=1, align_by="longest", split_above_tokens=40,
              max_num_batched_tokens=256)
    ex = FakeExecutor(s, lag_steps=0)
    first = [make("a", 50 if running_long else 10, 30), make("b", 11, 30), make("c", 12, 2)]
    for r in first:
        s.add_request(r)
    ex.step()
    for r in (make("s1", 10, 5), make("s2", 11, 5), make("long1", 45, 5), make("long2", 60, 5)):
        s.add_request(r)
    while "c" in s.requests:
        ex.step()
    ex.step()  # c's slot is refilled
    joined = {r.request_id for r in s.running} - {"a", "b"}
    assert joined == ({"s1"} if running_long else {"long1"}), joined
    outputs = ex.run()
    assert outputs["long2"] == expected(make("long2", 60, 5))


def test_a_long_member_that_does_not_fit_yet_holds_up_no_one():
    """The split-first rule puts a long request first only when it fits the free room:
    otherwise the short request behind it would wait for room it does not need."""
    s = sched(device_blocks=32, max_batch=3, min_batch=1, align_by="longest",
              split_above_tokens=40, max_num_batched_tokens=256)
    ex = FakeExecutor(s, lag_steps=0)
    for r in (make("a", 10, 30), make("b", 11, 30), make("c", 12, 2)):
        s.add_request(r)
    ex.step()
    for r in (make("s1", 10, 5), make("long2", 60, 5)):
        s.add_request(r)
    while "c" in s.requests:
        ex.step()
    long2 = s.requests["long2"]
    assert s.fit.cost(long2) > s.fit.room(s.running), "the long request does not fit yet"
    ex.step()
    assert {r.request_id for r in s.running} == {"a", "b", "s1"}
    assert ex.run()["long2"] == expected(make("long2", 60, 5))


def test_full_host_pool_makes_new_requests_wait_not_drop():
    s = sched(device_blocks=64, host_blocks=12, max_batch=4, min_batch=1, host_watermark=0.0)
    reqs = [make(f"r{i}", 14, 3) for i in range(6)]  # 4 host blocks each: 3 fit
    for r in reqs:
        s.add_request(r)
    s.schedule()
    assert len(s.waiting) == 3 and s.swap.host.num_free == 0
    outputs = FakeExecutor(s).run()
    assert outputs == {r.request_id: expected(r) for r in reqs}


@pytest.mark.parametrize("where", ["waiting", "pooled", "running", "staged"])
def test_abort_frees_device_and_host_blocks_in_every_state(where):
    s = sched(device_blocks=64, host_blocks=24, max_batch=2, min_batch=1, host_watermark=0.0)
    reqs = [make(f"r{i}", 12, 5) for i in range(12)]
    for r in reqs:
        s.add_request(r)
    ex = FakeExecutor(s, lag_steps=2)
    ex.step()
    ex.step()
    if where == "staged":
        victim = s.running[0]
        s._swap_out(victim)  # back to the pool (or recompute if the host is full)
        assert s.swap.swap_in(victim)  # its KV on its way back: the candidate buffer
        s.buffer.staged[victim.request_id] = victim
    else:
        pools = {"waiting": list(s.waiting), "pooled": list(s.pooled.values()),
                 "running": s.running}
        victim = pools[where][0]
    assert s.finish(victim.request_id, FinishReason.ABORT) is victim
    assert victim.finished and not victim.block_ids and not victim.host_block_ids
    ex.run()
    assert s.device.num_free_blocks == 64 and s.swap.host.num_free == 24


def test_same_tokens_as_fcfs_schedule_independent():
    """Outputs depend only on the request, not on which policy or batch ran it."""
    from alignedserve.scheduling.fcfs import FCFSScheduler, SchedulerLimits

    rng = random.Random(7)
    specs = [(f"r{i}", rng.randint(2, 60), rng.randint(1, 12)) for i in range(30)]
    a = sched(device_blocks=60, host_blocks=800, max_batch=6, min_batch=3)
    for rid, n, m in specs:
        a.add_request(make(rid, n, m))
    got = FakeExecutor(a).run()
    f = FCFSScheduler(KVBlockManager(60, BS), SchedulerLimits(6, 64))
    for rid, n, m in specs:
        f.add_request(make(rid, n, m))
    want = {}
    while f.has_unfinished():
        out = f.schedule()
        sampled = {c.request.request_id: FakeExecutor.token(c.request.request_id, c.end)
                   for c in out.chunks if c.samples}
        want.update({r.request_id: r.output_token_ids for r in f.update(out, sampled)})
    assert got == want


def test_staged_requests_join_without_a_fence():
    """Candidate-requests buffer: a swapped-out request near the running batch's lengths
    is copied in ahead of time, and joins a freed slot without the step waiting on it."""
    s = sched(max_batch=3, min_batch=1, refill_buffer=4, max_spread=2.0)
    ex = FakeExecutor(s, lag_steps=0)
    for r in (make("short", 30, 4), make("x", 31, 40), make("y", 33, 40), make("z", 33, 40)):
        s.add_request(r)
    ex.step()
    ex.step()
    assert s.requests["z"].status is RequestStatus.WAITING, "the batch holds three"
    y = s.requests["y"]
    s._swap_out(y)  # y waits in the pool, its KV in the host pool, as old as z
    ex.step()  # z, as old and shorter (y has grown), takes the free slot
    assert s.requests["z"].status is RequestStatus.RUNNING
    assert "y" in s.buffer and y.block_ids, "y's KV is being prefetched"
    while "short" in s.requests:
        ex.step()
    ex.step()
    assert y.status is RequestStatus.RUNNING and s.stats().counters["refill_hits"] == 1
    assert ex.outs[-1].fence == 0 or all(
        t.seq <= s.swap.done_seq for t in ex.outs[-1].transfers), "no wait on y's copy"
    outputs = ex.run()
    assert set(outputs) == {"x", "y", "z"}
    assert s.device.num_free_blocks == 256 and s.swap.host.num_free == 1024


def test_a_member_about_to_finish_makes_room_for_a_newcomer():
    """The room kept for growth counts that a member finishing within the lookahead frees
    its blocks: the newcomer joins now, where reserving every member's full lookahead
    (a: 1 block, b: 9, room 0) would hold it back; nothing is swapped out for it."""
    s = sched(device_blocks=40, max_batch=4, min_batch=1, lookahead_tokens=32,
              max_num_batched_tokens=128, align_by="total")
    ex = FakeExecutor(s, lag_steps=0)
    s.add_request(make("a", 60, 3))
    s.add_request(make("b", 60, 40))
    ex.step()  # both prefilled: 15 blocks each, a has 2 tokens to go
    assert s.device.num_free_blocks == 10
    s.add_request(c := make("c", 20, 4))  # 6 blocks with its growth
    ex.step()
    assert c.status is RequestStatus.RUNNING
    outputs = ex.run()
    assert all(outputs[r.request_id] == expected(r) for r in (c,))
    assert s.stats().counters["preemptions"] == 0


@pytest.mark.parametrize("seed", range(20))
def test_peak_growth_is_never_below_the_exact_future_peak(seed):
    """`_peak_growth` bounds, from above, the most blocks the running members will need
    beyond what they hold at any step of the lookahead (each finishing member freeing its
    blocks), and overshoots by less than one block per member."""
    rng = random.Random(seed)
    s = sched(device_blocks=4096, max_batch=32, min_batch=1,
              lookahead_tokens=rng.choice([0, 5, 16, 64]), max_num_batched_tokens=4096,
              align_by="total")
    ex = FakeExecutor(s, lag_steps=0)
    for k in range(rng.randint(1, 20)):
        s.add_request(make(f"r{k}", rng.randint(1, 90), rng.randint(1, 80)))
    for _ in range(rng.randint(1, 6)):
        ex.step()
    look = s.cfg.lookahead_tokens
    held = sum(len(r.block_ids) for r in s.running)
    left = {r.request_id: r.params.max_tokens - r.num_output_tokens for r in s.running}
    exact = max(sum(-(-(r.num_tokens + t) // BS) for r in s.running if t < left[r.request_id])
                for t in range(look + 1))
    assert exact - held <= s.fit.peak_growth(s.running) <= max(0, exact - held) + len(s.running) + 1


def test_a_swapped_out_member_keeps_its_place_in_the_aging_order():
    """A member sent back to the pool rejoins before requests that arrived after it (as a
    preempted request goes first in vLLM), not as if it had just arrived."""
    s = sched(max_batch=2, min_batch=1, align_by="total", max_num_batched_tokens=128)
    ex = FakeExecutor(s, lag_steps=0)
    s.add_request(make("a", 20, 30))
    s.add_request(b := make("b", 20, 30))
    ex.step()
    s.add_request(c := make("c", 20, 30))
    ex.step()
    assert c.status is RequestStatus.WAITING
    s._swap_out(b)
    ex.step()
    assert b.status is RequestStatus.RUNNING and c.status is RequestStatus.WAITING
    outputs = ex.run()
    assert outputs["b"] == expected(b) and outputs["c"] == expected(c)
