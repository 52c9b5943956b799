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


def test_under_a_load_balanced_kernel_dispatch_is_oldest_first_whatever_the_length():
    """align_by "total" (CPU replicas' paged kernel): the same queue as above goes out in
    arrival order, not in length windows."""
    queue = _queue([10, 11, 12, 13, 500, 510, 2000], [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    knobs = DispatchKnobs(1.5, 0, 10.0, align_by="total")
    plan = plan_dispatch(queue, [Room("small", 2), Room("big", 3)], knobs, now=101.0)
    assert plan == [("big", ["q4", "q5", "q6"]), ("small", ["q2", "q3"])]


def test_everything_fits_everything_goes_and_full_replicas_get_nothing():
    queue = _queue([5, 900])
    assert plan_dispatch(queue, [Room("a", 0), Room("b", 4)], KNOBS, 0.0) == [
        ("b", ["q0", "q1"])]
    assert plan_dispatch(queue, [Room("a", 0)], KNOBS, 0.0) == []
    assert plan_dispatch([], [Room("a", 3)], KNOBS, 0.0) == []


def test_a_starving_request_is_served_with_its_aged_peers():
    # q6 (2000 tokens) is about 4.2 bands above 500-510 and 12.8 above 10-13; the densest
    # window would skip it forever. Aging forgives one band per max_queue_delay_s (10 s).
    queue = _queue([10, 11, 12, 13, 500, 510, 2000],
                   [100.0, 100.0, 100.0, 100.0, 55.0, 55.0, -40.0])
    plan = plan_dispatch(queue, [Room("r", 3)], KNOBS, now=100.5)
    assert plan == [("r", ["q4", "q5", "q6"])]  # around q6: its peers that waited enough
    # Under the bound (a leader that counts from arrival, not from when it saw the request):
    calm = plan_dispatch(queue, [Room("r", 3)], KNOBS, now=75.0)
    assert calm == [("r", ["q1", "q2", "q3"])]
    # One band per horizon: q6 is not yet due after 100 s, at 12.8 bands from the window.
    assert "q6" not in plan_dispatch(queue, [Room("r", 3)], KNOBS, now=60.0)[0][1]


def test_the_starving_request_is_never_crowded_out_by_equal_lengths():
    queue = _queue([50, 50, 50, 50, 900], [9.0, 9.0, 9.0, 0.0, 9.0])
    plan = plan_dispatch(queue, [Room("r", 2)], KNOBS, now=10.5)
    assert "q3" in plan[0][1] and len(plan[0][1]) == 2


def test_a_short_queue_is_spread_so_every_replica_is_left_the_same_room():
    queue = _queue([10, 11, 12, 13])
    plan = dict(plan_dispatch(queue, [Room("a", 6), Room("b", 4)], KNOBS, 0.0))
    assert {k: len(v) for k, v in plan.items()} == {"a": 3, "b": 1}  # 3 left in each
    assert sorted(plan["a"] + plan["b"]) == ["q0", "q1", "q2", "q3"]


def _on(node: str, lengths: list[int], first: int = 0) -> list[Queued]:
    return [Queued(f"{node}{first + i}", n, 100.0, node) for i, n in enumerate(lengths)]


def test_replicas_take_their_own_nodes_kv_first():
    queue = sorted(_on("A", [10, 20, 30]) + _on("B", [11, 21, 31]), key=lambda q: q.kv_len)
    plan = dict(plan_dispatch(queue, [Room("ra", 3, "A"), Room("rb", 3, "B")], KNOBS, 0.0))
    assert sorted(plan["ra"]) == ["A0", "A1", "A2"]  # no KV crosses nodes
    assert sorted(plan["rb"]) == ["B0", "B1", "B2"]


def test_an_idle_node_takes_what_a_busy_node_prefilled_beyond_the_locality_slack():
    # Everything was prefilled on A. Within the slack it stays there (no copies) ...
    queue = _on("A", [10, 11, 12, 13, 14, 15])
    rooms = [Room("ra", 8, "A"), Room("rb", 8, "B")]
    assert plan_dispatch(queue, rooms, KNOBS, 0.0) == [("ra", [q.request_id for q in queue])]
    # ... past it, B's idle replica takes its share: the load evens out, KV moves.
    strict = DispatchKnobs(1.5, 0, 10.0, locality_slack=0)
    plan = dict(plan_dispatch(queue, rooms, strict, 0.0))
    assert len(plan["ra"]) == 3 and len(plan["rb"]) == 3
    slack1 = DispatchKnobs(1.5, 0, 10.0, locality_slack=1)
    plan = dict(plan_dispatch(queue, rooms, slack1, 0.0))
    assert len(plan["ra"]) == 4 and len(plan["rb"]) == 2
    # A replica nearly full on A fills up with its own; the rest goes to B (strictly even:
    # all of it, as B is left the more room).
    rooms = [Room("ra", 2, "A"), Room("rb", 8, "B")]
    plan = dict(plan_dispatch(queue, rooms, KNOBS, 0.0))
    assert len(plan["ra"]) == 2 and len(plan["rb"]) == 4
    assert plan_dispatch(queue, rooms, strict, 0.0) == [("rb", [q.request_id for q in queue])]
    # A node with no replica left (it died) has its queued requests served elsewhere.
    plan = dict(plan_dispatch(queue, [Room("rb", 8, "B")], KNOBS, 0.0))
    assert len(plan["rb"]) == 6


def test_on_one_node_shares_are_even_whatever_the_slack():
    queue = _queue([10, 11, 12, 13, 14, 15])
    plan = dict(plan_dispatch(queue, [Room("a", 8), Room("b", 8)], KNOBS, 0.0))
    assert len(plan["a"]) == 3 and len(plan["b"]) == 3


def test_cross_node_fill_comes_after_local_fill_within_a_share():
    queue = sorted(_on("A", [10, 11, 12, 13]) + _on("B", [50]), key=lambda q: q.kv_len)
    strict = DispatchKnobs(1.5, 0, 10.0, locality_slack=0)
    plan = dict(plan_dispatch(queue, [Room("ra", 2, "A"), Room("rb", 3, "B")], strict, 0.0))
    assert plan["rb"][0] == "B0"  # its own request first, then two of A's
    assert len(plan["rb"]) == 3 and len(plan["ra"]) == 2
    assert len({*plan["ra"], *plan["rb"]}) == 5
