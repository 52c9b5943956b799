"""Host KV pool: capacity accounting and exact block round trips with the device pool."""

from __future__ import annotations

import pytest
import torch

from alignedserve.kv_store.host_pool import HostKVPool


def test_blocks_round_trip_exactly_between_device_and_host():
    shape = (2, 2, 4, 3, 8)  # layers, K|V, slots, kv_heads, head_dim
    device = torch.randn(10, *shape)
    host = HostKVPool(6, shape, torch.float32)
    ids = host.allocate(3)
    assert ids is not None and host.usage == 0.5
    host.write_from(ids, device, [7, 2, 5])
    restored = torch.zeros_like(device)
    host.read_into(ids, restored, [0, 1, 9])
    assert torch.equal(restored[0], device[7]) and torch.equal(restored[1], device[2])
    assert torch.equal(restored[9], device[5])
    assert restored[2:9].abs().sum() == 0, "only the named blocks are written"


def test_full_pool_refuses_without_taking_anything():
    host = HostKVPool(4, (1, 2, 2, 1, 2), torch.float32)
    a = host.allocate(3)
    assert host.allocate(2) is None and host.usage == 0.75
    host.free(a)
    assert host.usage == 0.0 and host.allocate(4) is not None


def test_mismatched_block_lists_raise():
    host = HostKVPool(2, (1, 2, 2, 1, 2), torch.float32)
    src = torch.zeros(3, 1, 2, 2, 1, 2)
    with pytest.raises(ValueError, match="1 host blocks for 2"):
        host.write_from([0], src, [0, 1])
    with pytest.raises(ValueError, match="2 host blocks for 1"):
        host.read_into([0, 1], src, [0])
