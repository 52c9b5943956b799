"""A compute replica and its prefetch worker share the node's cores through the device
arena's header: each takes the whole pair's threads only while the other is idle."""

from __future__ import annotations

import torch

from alignedserve.prefetch_workers.cores import HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, CoreShare


def test_each_side_widens_only_while_the_other_idles():
    before = torch.get_num_threads()
    header = torch.zeros(8, dtype=torch.int64)  # the arena header (slot 0: transfer fence)
    replica = CoreShare(header, HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, 1, 2)
    worker = CoreShare(header, HEADER_WORKER_BUSY, HEADER_REPLICA_BUSY, 1, 2)
    try:
        assert replica.before_step() == 2, "decode tail: no prompt to prefill"
        assert torch.get_num_threads() == 2 and header[HEADER_REPLICA_BUSY] == 1
        assert worker.before_step() == 1, "the replica is decoding: one core each"
        assert replica.before_step() == 1, "a prompt arrived: the replica gives a core back"
        worker.set_busy(False)
        assert replica.before_step() == 2 and header[HEADER_WORKER_BUSY] == 0
        replica.set_busy(False)
        assert worker.before_step() == 2, "a burst with nothing to decode: the worker widens"
        assert header[0] == 0, "the transfer fence slot is left alone"
    finally:
        torch.set_num_threads(before)


def test_pair_threads_never_shrink_a_side_below_its_own():
    header = torch.zeros(8, dtype=torch.int64)
    before = torch.get_num_threads()
    try:
        side = CoreShare(header, HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, 2, 1)
        assert side.before_step() == 2
    finally:
        torch.set_num_threads(before)
