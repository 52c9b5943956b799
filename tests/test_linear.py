"""The prepacked linear layer (`engine/linear.py`) against `F.linear`, and its fallback on a
CPU whose oneDNN has no bf16 path (AVX2-only hosts: the prepack would raise)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignedserve.engine import linear
from alignedserve.engine.linear import Linear


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_bfloat16_packs_only_where_onednn_supports_it(monkeypatch, bf16_supported):
    if bf16_supported and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 path")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_supported)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g).to(torch.bfloat16)
    b = torch.randn(48, generator=g).to(torch.bfloat16)
    x = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    layer = Linear(w, b)
    assert layer.packed is (bf16_supported and linear._can_pack(w))
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=2e-2, atol=2e-2)


def test_float32_prepacked_matches_f_linear():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    x = torch.randn(3, 24, generator=g)
    torch.testing.assert_close(Linear(w, b)(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
