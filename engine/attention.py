"""Attention over the paged KV cache, with interchangeable decode backends.

One step's tokens are laid out flat: first `num_decode` decode tokens (one per sequence),
then each prefill chunk's tokens contiguously. Every layer first stores the new K/V into
the cache, then attends:
- decode tokens through the chosen `DecodeBackend` (paged = the C++ kernel that reads KV
  blocks in place, `engine/csrc/`; dense = padded, one SDPA call; varlen = one SDPA call
  per sequence, no padding; flash = CUDA paged kernel);
- prefill chunks one call each, causal: on the CPU the C++ paged prefill kernel
  (`engine/csrc/paged_prefill.cpp`; fp32, and bf16 where the CPU has AVX512-BF16), which
  reads every chunk's KV from the cache in place and skips keys past the diagonal;
  otherwise one SDPA call, reading earlier chunks' KV back from the cache.
  The SDPA calls are 4-D ([1, heads, q_len, dim]): torch's CPU flash kernel takes those,
  while 3-D inputs fall back to the unfused math path (3-4.5x slower at 1,024 tokens,
  measured here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from alignedserve.engine.cpuinfo import cpu_flags
from alignedserve.engine.kv_cache import PagedKVCache
from alignedserve.engine.native import kernels


@dataclass(frozen=True)
class DecodeBatch:
    """Decode sequences of a step. Built once per step, shared by all layers."""

    kv_lens: list[int]  # KV length of each sequence including this step's token
    tables: torch.Tensor  # dense: [num_seqs, max_blocks] padded with block 0; else [sum blocks]
    starts: list[int]  # varlen: row of each sequence's first token in the gathered blocks
    mask: torch.Tensor | None  # dense: [num_seqs, 1, 1, max_blocks*block_size] True = attend
    window: int | None  # sliding window in tokens, or None
    table_starts: torch.Tensor | None = None  # paged: [num_seqs] offset of each table in tables
    lens: torch.Tensor | None = None  # paged: kv_lens as an int64 tensor


class DecodeBackend(Protocol):
    """Attention of one query token per sequence against its cached KV.

    forward: q [B, heads, head_dim] -> [B, heads, head_dim], written into `out` when given
    (a contiguous tensor of q's shape: the step's attention output rows). GQA is handled by
    folding the query heads that share a KV head into the query-length axis, so KV is never
    repeated.
    """

    name: str
    align_by: str  # what a misaligned member costs this kernel (AlignedKnobs.align_by)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: DecodeBatch, scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def _into(res: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A torch backend's result, copied into `out` when the caller gave one."""
    return res if out is None else out.copy_(res)


def padding_fraction(kv_lens: list[int]) -> float:
    """Extra attention work a padded batch does, relative to the real KV tokens."""
    real = sum(kv_lens)
    return (len(kv_lens) * max(kv_lens) - real) / real if real else 0.0


def build_decode_batch(
    tables: list[list[int]], kv_lens: list[int], block_size: int, window: int | None, dense: bool
) -> DecodeBatch:
    if not dense:
        starts, row = [], 0
        for t in tables:
            starts.append(row)
            row += len(t) * block_size
        flat = torch.tensor([b for t in tables for b in t], dtype=torch.long)
        first = torch.tensor([r // block_size for r in starts], dtype=torch.long)
        lens = torch.tensor(kv_lens, dtype=torch.long)
        return DecodeBatch(kv_lens, flat, starts, None, window, first, lens)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    pos = torch.arange(width * block_size)
    lens = torch.tensor(kv_lens)[:, None]
    keep = pos[None, :] < lens
    if window is not None:
        keep &= pos[None, :] > lens - 1 - window
    return DecodeBatch(kv_lens, padded, [], keep[:, None, None, :], window)


class DenseDecode:
    """Pads every sequence to the batch's longest KV; one SDPA call. Best when aligned."""

    name = "dense"
    align_by = "spread"  # every member pays for the longest

    def forward(self, q, k, v, b: DecodeBatch, scale: float, out=None) -> torch.Tensor:
        n, heads, dim = q.shape
        kv_heads = k.shape[2]
        kp = k.index_select(0, b.tables.flatten()).view(n, -1, kv_heads, dim).transpose(1, 2)
        vp = v.index_select(0, b.tables.flatten()).view(n, -1, kv_heads, dim).transpose(1, 2)
        qg = q.view(n, kv_heads, heads // kv_heads, dim)  # [B, kv_heads, group, dim]
        res = F.scaled_dot_product_attention(qg, kp, vp, attn_mask=b.mask, scale=scale)
        return _into(res.reshape(n, heads, dim), out)


class VarlenDecode:
    """One SDPA call per sequence over exactly its KV; no padding work."""

    name = "varlen"
    align_by = "total"  # one call per sequence, each over all threads

    def forward(self, q, k, v, b: DecodeBatch, scale: float, out=None) -> torch.Tensor:
        _, heads, dim = q.shape
        kv_heads = k.shape[2]
        kall = k.index_select(0, b.tables).flatten(0, 1)  # [sum blocks*block_size, kv_heads, dim]
        vall = v.index_select(0, b.tables).flatten(0, 1)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for i, (row, length) in enumerate(zip(b.starts, b.kv_lens, strict=True)):
            lo = max(0, length - b.window) if b.window is not None else 0
            ki = kall[row + lo : row + length].transpose(0, 1)  # [kv_heads, L, dim]
            vi = vall[row + lo : row + length].transpose(0, 1)
            qi = q[i].view(kv_heads, heads // kv_heads, dim)
            out[i] = F.scaled_dot_product_attention(qi, ki, vi, scale=scale).reshape(heads, dim)
        return out


class PagedDecode:
    """The C++ kernel (`engine/csrc/paged_attention.cpp`): reads each sequence's KV blocks
    in place, exactly its length, fp32 accumulation; one call per layer for the batch."""

    name = "paged"
    align_by = "total"  # work split over threads longest first (LPT)

    def forward(self, q, k, v, b: DecodeBatch, scale: float, out=None) -> torch.Tensor:
        mod = kernels()
        if mod is None:
            raise RuntimeError("the paged backend needs the C++ kernels (engine/native.py)")
        window = b.window if b.window is not None else 0
        # The kernel reads rows any stride apart (a view of the fused qkv projection: no
        # copy per layer) as long as each row's heads are contiguous.
        if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
            q = q.contiguous()
        return mod.paged_decode(q, k, v, b.tables, b.table_starts, b.lens, window, scale, out)


class FlashAttnDecode:
    """CUDA only, NOT exercised in CI (no GPU here): flash-attn's paged-KV decode kernel."""

    name = "flash"
    align_by = "longest"  # one work unit per sequence: the longest stalls

    def forward(self, q, k, v, b: DecodeBatch, scale: float, out=None) -> torch.Tensor:
        from flash_attn import flash_attn_with_kvcache

        lens = torch.tensor(b.kv_lens, dtype=torch.int32, device=q.device)
        window = (b.window - 1, 0) if b.window is not None else (-1, -1)
        res = flash_attn_with_kvcache(
            q[:, None], k, v, cache_seqlens=lens, block_table=b.tables.to(q.device, torch.int32),
            softmax_scale=scale, causal=True, window_size=window,
        )
        return _into(res[:, 0], out)


DECODE_BACKENDS: dict[str, DecodeBackend] = {
    "dense": DenseDecode(),
    "varlen": VarlenDecode(),
    "paged": PagedDecode(),
    "flash": FlashAttnDecode(),
}


@dataclass(frozen=True)
class PrefillChunk:
    """A prefill chunk: query rows [q_start, q_start+q_len), positions [start, start+q_len)."""

    q_start: int
    q_len: int
    start: int
    blocks: torch.Tensor  # [blocks] ids covering positions [0, start+q_len)
    mask: torch.Tensor | None  # [q_len, start+q_len] True = attend; None = causal from 0
    # (the paged prefill kernel builds its own causal window and ignores it)


def paged_prefill_fits(cache: PagedKVCache, head_dim: int) -> bool:
    """Whether the C++ prefill kernel takes this cache: on the CPU, fp32 (or bf16 in a build
    with AVX512-BF16), a head dim that is a multiple of 32 up to 256, blocks of 16 or 32."""
    mod = kernels()
    dtype = str(cache.kv.dtype).removeprefix("torch.")
    return (cache.kv.device.type == "cpu" and mod is not None
            and dtype in mod.paged_prefill_dtypes()
            and head_dim % 32 == 0 and head_dim <= 256 and cache.block_size in (16, 32))


def use_prefill_kernel(mode: str, cache: PagedKVCache, head_dim: int) -> bool:
    """`EngineConfig.prefill_attention`: "kernel" where it fits, "sdpa" never; "auto" also
    leaves bf16 to SDPA on CPUs with AMX. There torch's flash attention runs its products
    on AMX tiles (oneDNN's brgemm), 2.5-3.5x faster than the kernel's AVX512-BF16 dot
    products even counting the gather copy and masked scores of a later chunk; in fp32 the
    kernel is 1.2-1.3x faster (BENCHMARKS.md, sixteenth session)."""
    if mode == "sdpa" or not paged_prefill_fits(cache, head_dim):
        return False
    return mode == "kernel" or not (cache.kv.dtype == torch.bfloat16 and "amx_bf16" in cpu_flags())


def prefill_mask(start: int, q_len: int, window: int | None) -> torch.Tensor | None:
    if start == 0 and (window is None or q_len <= window):
        return None
    q_pos = torch.arange(start, start + q_len)[:, None]
    k_pos = torch.arange(start + q_len)[None, :]
    keep = k_pos <= q_pos
    if window is not None:
        keep &= k_pos > q_pos - window
    return keep


@dataclass
class AttentionStep:
    """Everything attention needs for one step; passed explicitly to the model forward."""

    cache: PagedKVCache
    slot_blocks: torch.Tensor  # [T] block id of each new token
    slot_offsets: torch.Tensor  # [T] offset within the block
    num_decode: int
    decode: DecodeBatch | None
    backend: DecodeBackend
    prefills: list[PrefillChunk]
    # the C++ kernel's paged_prefill, resolved once by the runner where paged_prefill_fits
    prefill_kernel: Callable[..., torch.Tensor] | None = None
    window: int | None = None  # the model's sliding window, for the prefill kernel

    def forward(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim]. Returns [T, heads*dim]."""
        self.cache.write(layer, k, v, self.slot_blocks, self.slot_offsets)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: q is a view
        nd = self.num_decode
        if nd and self.decode is not None:
            kc, vc = self.cache.k[layer], self.cache.v[layer]
            self.backend.forward(q[:nd], kc, vc, self.decode, scale, out[:nd])
        for c in self.prefills:
            rows = slice(c.q_start, c.q_start + c.q_len)
            if self.prefill_kernel is not None:
                kc, vc = self.cache.k[layer], self.cache.v[layer]
                out[rows] = self.prefill_kernel(
                    q[rows].contiguous(), kc, vc, c.blocks, c.start, self.window or 0, scale)
                continue
            qi = q[rows].transpose(0, 1)  # [heads, q_len, dim]
            if c.start == 0:
                ki, vi = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            else:
                ki, vi = self.cache.gather(layer, c.blocks, c.start + c.q_len)
            oi = F.scaled_dot_product_attention(
                qi[None], ki[None], vi[None], attn_mask=c.mask, is_causal=c.mask is None,
                scale=scale, enable_gqa=True,
            )
            out[rows] = oi[0].transpose(0, 1)
        return out.flatten(1)
