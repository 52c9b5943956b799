"""Density-first window search and the KV-length index (pure Python)."""

from __future__ import annotations

import random

from alignedserve.scheduling.length_index import InMemoryLengthIndex
from alignedserve.scheduling.window_search import aging_score, band_distance, densest_window


def search(lengths, costs=None, **kw):
    costs = costs or [1] * len(lengths)
    args = dict(min_batch=3, max_batch=8, max_spread=1.25, budget=1000) | kw
    return densest_window(lengths, costs, **args)


def test_picks_the_densest_cluster_not_the_first():
    lengths = [10, 40, 100, 101, 102, 103, 104, 400, 900]
    w = search(lengths)
    assert (w.lo, w.hi) == (2, 7) and w.spread == 104 / 100


def test_respects_max_batch_and_budget():
    lengths = [100] * 20
    assert search(lengths).size == 8
    assert search(lengths, budget=5).size == 5
    costs = [3] * 20
    assert search(lengths, costs, budget=10).size == 3


def test_falls_back_to_the_narrowest_window_of_min_size():
    lengths = [10, 30, 90, 270, 300, 810]  # nothing within 1.25x except (270, 300)
    w = search(lengths)
    assert w.size == 3 and (w.lo, w.hi) == (3, 6), "270..810 (3.0x) beats 90..300 (3.3x)"


def test_fewer_requests_than_min_batch_still_run():
    assert search([50, 500]).size == 2
    assert search([], []) is None


def test_none_only_when_nothing_fits():
    assert search([100, 200], [5, 6], budget=4) is None
    w = search([100, 200], [5, 3], budget=4)
    assert (w.lo, w.hi) == (1, 2)


def test_window_is_optimal_against_brute_force():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 30)
        lengths = sorted(rng.randint(1, 3000) for _ in range(n))
        costs = [max(1, x // 64) for x in lengths]
        kw = dict(min_batch=rng.randint(1, 6), max_batch=rng.randint(6, 12),
                  max_spread=rng.choice([1.1, 1.5, 2.0]), budget=rng.randint(5, 200),
                  slack_tokens=rng.choice([0, 0, 50, 400]))
        w = search(lengths, costs, **kw)
        ok = [(lo, hi) for lo in range(n) for hi in range(lo + 1, n + 1)
              if hi - lo <= kw["max_batch"] and sum(costs[lo:hi]) <= kw["budget"]
              and (lengths[hi - 1] <= kw["max_spread"] * lengths[lo]
                   or lengths[hi - 1] - lengths[lo] <= kw["slack_tokens"])]
        big = [(hi - lo, -(lengths[hi - 1] / lengths[lo])) for lo, hi in ok
               if hi - lo >= min(kw["min_batch"], n)]
        if big:
            assert (w.size, -w.spread) == max(big)
        if w is not None:
            assert sum(costs[w.lo:w.hi]) <= kw["budget"] and w.size <= kw["max_batch"]


def test_band_distance_counts_bands_beyond_the_aligned_range():
    assert band_distance(120, 100, 140, max_spread=1.5) == 0.0  # joins still aligned
    assert band_distance(300, 100, 300, max_spread=1.5) == 0.0  # inside, even if wide
    one = band_distance(160, 100, 140, max_spread=1.5)  # 1.6x: just past the band
    two = band_distance(225, 100, 140, max_spread=1.5)  # one more 1.5x factor out
    assert 1.0 <= one < 1.2 and 1.9 < two < 2.1
    assert band_distance(50, 100, 140, max_spread=1.5) >= 1.0  # shorter counts the same way
    assert band_distance(200, 100, 140, max_spread=1.5, slack_tokens=128) == 0.0


def test_aging_score_lets_a_far_request_in_after_a_bounded_wait():
    near, far = 0.0, band_distance(4000, 100, 140, max_spread=1.5)
    assert aging_score(near, 0, 256) <= 0 < aging_score(far, 0, 256)
    wait = far * 256  # one horizon per band of distance
    assert aging_score(far, wait, 256) <= 0
    # a burst waits alike: the nearer of two equally old requests goes first
    assert aging_score(1.0, 600, 256) < aging_score(2.0, 600, 256)


def test_length_index_orders_moves_and_removes():
    idx = InMemoryLengthIndex()
    idx.put("a", 30)
    idx.put("b", 10)
    idx.put("c", 30)
    assert idx.sorted_items() == [(10, "b"), (30, "a"), (30, "c")]
    idx.put("b", 31)  # grows past the others
    assert idx.sorted_items() == [(30, "a"), (30, "c"), (31, "b")]
    assert idx.remove("a") and not idx.remove("a")
    assert len(idx) == 2 and "a" not in idx and "c" in idx
