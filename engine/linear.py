"""Linear layers with their weights prepacked for oneDNN once, at load.

`F.linear` on the CPU reorders nothing ahead of time and, in fp32, goes through a GEMM that
is 1.5-2.5x slower than oneDNN's on this model's shapes (measured here: the 49,152 x 576 LM
head at 8 rows takes 16.4 ms through `F.linear` and 6.4 ms prepacked; a 1,536 x 576
projection at 64 rows 0.78 vs 0.53 ms). torch exposes oneDNN's prepacked linear as
`torch.ops.mkldnn._linear_pointwise` over a weight reordered by `_reorder_linear_weight`
(the path its own inductor CPU backend uses). Where oneDNN is missing, or the tensors are
not on the CPU, the layer is plain `F.linear`.

Exactness: fp32 greedy decoding is checked against transformers token for token with the
prepacked path (tests/test_exactness.py); a different GEMM blocking changes fp32 results in
the last bits, which is why that check exists.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_PACK_HINT = 64  # the batch size oneDNN tunes the packed layout for; any size works


def _can_pack(weight: torch.Tensor) -> bool:
    """oneDNN's bf16 path needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on a CPU without them
    (an AVX2-only host) an explicit bfloat16 model runs its linears through `F.linear`."""
    return (os.environ.get("ALIGNEDSERVE_NO_PREPACK") != "1"
            and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and (weight.dtype == torch.float32 or (
                weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())))


class Linear:
    """y = x @ weight.T + bias, for x [T, in]; weight [out, in] as in a state dict."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = _can_pack(weight)
        # The packed copy replaces the plain weight (no second copy in memory).
        self.weight = (torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT)
                       if self.packed else weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
