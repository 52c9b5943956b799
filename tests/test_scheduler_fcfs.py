"""FCFS scheduler driven by fake engine outputs (no model, no torch)."""

from __future__ import annotations

import pytest

from alignedserve.scheduling.block_manager import BlockAllocator, KVBlockManager
from alignedserve.scheduling.fcfs import FCFSScheduler, SchedulerLimits
from alignedserve.scheduling.request import FinishReason, Request, RequestStatus
from alignedserve.scheduling.sampling_params import SamplingParams

EOS = 2


def make(rid: str, prompt_len: int, max_tokens: int = 4, **kw) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return Request(rid, list(range(10, 10 + prompt_len)), params, frozenset({EOS}))


def run_step(s: FCFSScheduler, token: int = 7):
    out = s.schedule()
    sampled = {c.request.request_id: token for c in out.chunks if c.samples}
    return out, s.update(out, sampled)


def test_allocator_hands_out_each_block_once_and_detects_double_free():
    a = BlockAllocator(8)
    x = a.allocate(5)
    assert x is not None and len(set(x)) == 5
    assert a.allocate(4) is None and a.num_free == 3, "a failed allocate takes nothing"
    y = a.allocate(3)
    assert y is not None and not set(x) & set(y) and a.num_free == 0
    a.free(x)
    assert a.num_free == 5
    with pytest.raises(RuntimeError):
        a.free(x[:1])


def test_fcfs_admits_in_arrival_order_under_token_budget():
    s = FCFSScheduler(KVBlockManager(64, 4), SchedulerLimits(8, max_num_batched_tokens=10))
    for i, n in enumerate([6, 6, 3]):
        s.add_request(make(f"r{i}", n))
    out = s.schedule()
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("r0", 0, 6), ("r1", 0, 4)], "r1 gets a 4-token chunk; r2 waits behind it"
    assert out.num_batched_tokens == 10
    s.update(out, {"r0": 7})
    r1 = s.requests["r1"]
    assert r1.num_computed_tokens == 4 and r1.num_output_tokens == 0
    out2 = s.schedule()
    # decodes first, then the rest of r1's prefill, then r2
    assert [(c.request.request_id, c.num_new_tokens) for c in out2.chunks] == [
        ("r0", 1), ("r1", 2), ("r2", 3)]


def test_long_prefill_threshold_leaves_room_for_a_new_requests_first_chunk():
    limits = SchedulerLimits(8, max_num_batched_tokens=12, long_prefill_token_threshold=4)
    s = FCFSScheduler(KVBlockManager(64, 4), limits)
    s.add_request(make("long", 40))
    run_step(s)  # long: its first chunk (12 tokens: admission is not capped)
    s.add_request(make("new", 5))
    out, _ = run_step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [
        ("long", 4), ("new", 5)], "the running prompt is capped; the newcomer's prompt goes"
    assert s.requests["new"].num_output_tokens == 1, "the newcomer got its first token"
    out, _ = run_step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [
        ("new", 1), ("long", 4)], "decodes are never capped below one token"
    with pytest.raises(ValueError):
        SchedulerLimits(long_prefill_token_threshold=0)


def test_max_num_seqs_caps_running():
    s = FCFSScheduler(KVBlockManager(64, 4), SchedulerLimits(max_num_seqs=2))
    for i in range(3):
        s.add_request(make(f"r{i}", 3))
    out = s.schedule()
    assert len(out.chunks) == 2 and len(s.waiting) == 1


def test_finish_on_length_eos_and_stop_token_frees_blocks():
    kv = KVBlockManager(64, 4)
    s = FCFSScheduler(kv)
    s.add_request(make("len", 5, max_tokens=3))
    s.add_request(make("eos", 5, max_tokens=10))
    s.add_request(make("stopid", 5, max_tokens=10, stop_token_ids=(9,)))
    s.add_request(make("ign", 5, max_tokens=2, ignore_eos=True))
    out = s.schedule()
    tokens = {"len": 7, "eos": EOS, "stopid": 9, "ign": EOS}
    done = s.update(out, tokens)
    assert {r.request_id: r.finish_reason for r in done} == {
        "eos": FinishReason.STOP, "stopid": FinishReason.STOP}
    out = s.schedule()
    done = s.update(out, {"len": 7, "ign": EOS})  # "ign" ignores EOS, ends on max_tokens=2
    assert [(r.request_id, r.finish_reason) for r in done] == [("ign", FinishReason.LENGTH)]
    assert s.requests["len"].status is RequestStatus.RUNNING
    assert s.requests["len"].num_output_tokens == 2
    _, done = run_step(s)
    assert [(r.request_id, r.finish_reason) for r in done] == [("len", FinishReason.LENGTH)]
    assert not s.has_unfinished() and kv.num_free_blocks == kv.num_blocks


def test_preemption_by_recompute_when_blocks_run_out():
    kv = KVBlockManager(6, 4, watermark=0.0)  # 24 token slots
    s = FCFSScheduler(kv)
    s.add_request(make("a", 8, max_tokens=20))
    s.add_request(make("b", 8, max_tokens=20))
    s.add_request(make("c", 8, max_tokens=20))  # blocks: 2 + 2 + 2 = all six
    out, _ = run_step(s)
    assert len(out.chunks) == 3 and kv.num_free_blocks == 0
    # "a" needs a third block for position 8 -> the newest running request ("c") goes
    out, _ = run_step(s)
    assert out.preempted == ("c",)
    c = s.requests["c"]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0 and not c.block_ids
    assert c.num_output_tokens == 1, "generated tokens survive preemption and are recomputed"
    assert s.waiting[0] is c, "a preempted request goes back to the front of the queue"
    assert [ch.request.request_id for ch in out.chunks] == ["a", "b"]
    while s.has_unfinished():
        run_step(s)
    assert kv.num_free_blocks == kv.num_blocks
    assert s.num_preemptions >= 1


def test_abort_waiting_and_running_requests():
    kv = KVBlockManager(32, 4)
    s = FCFSScheduler(kv, SchedulerLimits(max_num_seqs=1))
    s.add_request(make("run", 5))
    s.add_request(make("wait", 5))
    run_step(s)
    assert s.finish("wait", FinishReason.ABORT).finish_reason is FinishReason.ABORT
    assert s.finish("run", FinishReason.ABORT) is not None
    assert s.finish("run", FinishReason.ABORT) is None, "second abort is a no-op"
    assert not s.has_unfinished() and kv.num_free_blocks == kv.num_blocks


def test_request_that_cannot_fit_is_rejected_and_duplicates_too():
    s = FCFSScheduler(KVBlockManager(2, 4))
    with pytest.raises(ValueError, match="cannot fit"):
        s.add_request(make("big", 9))
    s.add_request(make("ok", 3))
    with pytest.raises(ValueError, match="duplicate"):
        s.add_request(make("ok", 3))


@pytest.mark.parametrize(
    "kw",
    [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1),
     dict(min_p=1.5), dict(stop=("",)), dict(seed="x")],
)
def test_invalid_sampling_params_raise(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_scheduling_package_imports_no_torch_or_ray():
    import subprocess
    import sys

    code = (
        "import sys, alignedserve.scheduling.fcfs, alignedserve.scheduling.block_manager;"
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
