"""Density-first search for an aligned batch over requests sorted by KV length.

Pure functions over plain lists, so the engine, the router and the simulator share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Window:
    """Members [lo, hi) of the length-sorted list."""

    lo: int
    hi: int
    spread: float  # longest / shortest KV length in the window (>= 1)

    @property
    def size(self) -> int:
        return self.hi - self.lo


def _spread(lengths: Sequence[int], lo: int, hi: int) -> float:
    return lengths[hi - 1] / max(1, lengths[lo])


def aligned(shortest: int, longest: int, max_spread: float, slack_tokens: int = 0) -> bool:
    """True when KV lengths from `shortest` to `longest` count as one aligned batch: within
    the ratio `max_spread`, or within `slack_tokens` of each other (a padding that short
    costs little next to a step's linear layers, so short requests batch freely)."""
    return longest <= max(max_spread * max(1, shortest), shortest + slack_tokens)


def densest_window(
    lengths: Sequence[int],
    costs: Sequence[int],
    *,
    min_batch: int,
    max_batch: int,
    max_spread: float,
    budget: int,
    slack_tokens: int = 0,
) -> Window | None:
    """The batch to run next, from `lengths` sorted ascending.

    Rules, in order:
    1. Members' `costs` (KV blocks each will need) sum to at most `budget`.
    2. Prefer the largest window of at most `max_batch` members that is `aligned` (spread
       within `max_spread`, or width within `slack_tokens`), if it holds at least `min_batch`
       (or all requests, when fewer than `min_batch` exist). Ties: the narrowest spread.
    3. Otherwise take the narrowest-spread window of exactly that minimum size that fits.
    None only when not even the cheapest single request fits the budget.
    Runs in O(n) with two pointers and prefix sums.
    """
    n = len(lengths)
    if n == 0:
        return None
    prefix = [0, *accumulate(costs)]
    need = min(min_batch, n)
    best: Window | None = None  # the engine runs this every time a batch's members change
    size, spread = 0, 0.0  # best's (a Window is built only for a new best)
    lo = 0
    for hi in range(1, n + 1):
        while lo < hi and (
            not aligned(lengths[lo], lengths[hi - 1], max_spread, slack_tokens)
            or hi - lo > max_batch
            or prefix[hi] - prefix[lo] > budget
        ):
            lo += 1
        if hi - lo >= need:
            s = _spread(lengths, lo, hi)
            if best is None or hi - lo > size or (hi - lo == size and s < spread):
                best, size, spread = Window(lo, hi, s), hi - lo, s
    if best is not None:
        return best
    return _narrowest_fixed(lengths, prefix, need, budget)


def _narrowest_fixed(
    lengths: Sequence[int], prefix: list[int], size: int, budget: int
) -> Window | None:
    """Narrowest window of `size` members that fits, shrinking the size until one does."""
    for k in range(size, 0, -1):
        fitting = [
            Window(lo, lo + k, _spread(lengths, lo, lo + k))
            for lo in range(len(lengths) - k + 1)
            if prefix[lo + k] - prefix[lo] <= budget
        ]
        if fitting:
            return min(fitting, key=lambda w: w.spread)
    return None


def band_distance(length: int, lo: int, hi: int, max_spread: float,
                  slack_tokens: int = 0, by: str = "spread",
                  split_above: int | None = None) -> float:
    """How far `length` lies from the aligned band [lo, hi]: 0 when it joins the band still
    `aligned` (or lies inside it); otherwise 1 plus how many further `max_spread` factors it
    stretches the band (a request one band away is 1, two bands away about 2).

    `by` is what a misaligned member costs the decode kernel (`AlignedKnobs.align_by`):
    "spread" (padded attention: every member pays for the longest, so lengths must be
    close both ways), or "longest" (per-sequence kernels: only the longest member stalls a
    step, so a request no longer than the band's top joins freely; a longer one still
    counts from the band's bottom, which keeps a short band from creeping upward), or
    "total" (load-balanced kernels: a step costs the batch's total KV however lengths are
    grouped, so every length is at distance 0). Under "longest", `split_above` is where the
    kernel splits a long sequence into partitions (vLLM's V2, above 8,192 tokens): a step
    with a member that long has no straggler, so with one in the band, or as the newcomer,
    every length is at distance 0."""
    if by == "total" or (by == "longest" and (
            length <= hi or (split_above is not None and max(length, hi) > split_above))):
        return 0.0
    a, b = min(lo, length), max(hi, length)
    if lo <= length <= hi or aligned(a, b, max_spread, slack_tokens):
        return 0.0
    excess = b / (max_spread * max(1, a))
    return 1.0 + max(0.0, math.log(excess) / math.log(max(max_spread, 1.0 + 1e-9)))


def aging_score(distance: float, waited: float, horizon: float) -> float:
    """The aligned policy's order of service: band distance minus wait in units of the
    starvation horizon. A request is eligible to join at score <= 0: at once inside the
    band, after `horizon` of waiting one band away, after about 2 x `horizon` two bands away.
    Requests of one burst wait alike, so among them nearest length goes first (the bound
    never collapses into oldest-first); a lone old request still gets in within a bounded
    wait, since band distances are bounded."""
    return distance - max(0.0, waited) / horizon
