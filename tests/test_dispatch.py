"""The global dispatch policy (scheduling/dispatch.py): aligned groups, most room first,
no request twice, and the starvation bound on arrival-time clocks."""

from __future__ import annotations

from alignedserve.scheduling.dispatch import DispatchKnobs, Queued, Room, plan_dispatch

KNOBS = DispatchKnobs(max_spread=1.5, slack_tokens=0, max_queue_delay_s=10.0)


def _queue(lengths: list[int], arrivals: list[float] | None = None) -> list[Queued]:
    arrivals = arrivals or [100.0] * len(lengths)
    items = [Queued(f"q{i}", n, a) for i, (n, a) in enumerate(zip(lengths, arrivals,
                                                                   strict=True))]
    return sorted(items, key=lambda q: q.kv_len)


def test_each_replica_gets_the_densest_aligned_window_most_room_first():
    queue = _queue([10, 11, 12, 13, 500, 510, 2000])
    plan = plan_dispatch(queue, [Room("small", 2), Room("big", 3)], KNOBS, now=101.0)
    assert plan[0] == ("big", ["q1", "q2", "q3"])  # narrowest spread among windows of 3
    assert plan[1] == ("small", ["q4", "q5"])  # the next densest pair: 500 and 510
    assigned = [rid for _, rids in plan for rid in rids]
    assert len(assigned) == len(set(assigned))


def test_everything_fits_everything_goes_and_full_replicas_get_nothing():
    queue = _queue([5, 900])
    assert plan_dispatch(queue, [Room("a", 0), Room("b", 4)], KNOBS, 0.0) == [
        ("b", ["q0", "q1"])]
    assert plan_dispatch(queue, [Room("a", 0)], KNOBS, 0.0) == []
    assert plan_dispatch([], [Room("a", 3)], KNOBS, 0.0) == []


def test_a_starving_request_is_served_with_its_nearest_peers():
    # q6 (2000 tokens) arrived 30 s ago; the densest window would skip it forever.
    queue = _queue([10, 11, 12, 13, 500, 510, 2000],
                   [100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 70.0])
    plan = plan_dispatch(queue, [Room("r", 3)], KNOBS, now=100.5)
    assert plan == [("r", ["q4", "q5", "q6"])]  # around the oldest: the nearest lengths
    # Under the bound (a leader that counts from arrival, not from when it saw the request):
    calm = plan_dispatch(queue, [Room("r", 3)], KNOBS, now=75.0)
    assert calm == [("r", ["q1", "q2", "q3"])]


def test_the_starving_request_is_never_crowded_out_by_equal_lengths():
    queue = _queue([50, 50, 50, 50, 900], [9.0, 9.0, 9.0, 0.0, 9.0])
    plan = plan_dispatch(queue, [Room("r", 2)], KNOBS, now=10.5)
    assert "q3" in plan[0][1] and len(plan[0][1]) == 2
