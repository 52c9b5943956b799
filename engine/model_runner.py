"""Runs one scheduler step on the model: builds flat inputs, runs the forward, samples."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignedserve.engine.attention import (
    DECODE_BACKENDS,
    AttentionStep,
    DecodeBackend,
    PrefillChunk,
    build_decode_batch,
    padding_fraction,
    prefill_mask,
    use_prefill_kernel,
)
from alignedserve.engine.config import EngineConfig, ModelConfig
from alignedserve.engine.kv_cache import PagedKVCache
from alignedserve.engine.models import load_model
from alignedserve.engine.native import kernels
from alignedserve.engine.sampler import sample
from alignedserve.engine.sizing import pool_sizes
from alignedserve.scheduling.interface import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class StepStats:
    """What one step did; the benchmark aggregates these."""

    seconds: float  # wall time of build + forward + sample
    num_decode: int  # decode sequences (one token each)
    num_prefill_tokens: int  # prefill tokens across chunks
    backend: str  # decode attention backend used ("" when no decode)
    kv_lens: tuple[int, ...]  # KV length of each decode sequence
    padding: float  # attention work spent on padding / real work, for this step's decodes
    batch_switch: bool = False  # the scheduler replaced the running batch at this step


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, int]  # request id -> sampled token (only chunks that reached the end)
    logprobs: dict[str, float]  # request id -> raw logprob, for requests that asked for it
    stats: StepStats


class ModelRunner:
    def __init__(self, cfg: EngineConfig,
                 kv_storage: Callable[[int], torch.Tensor] | None = None) -> None:
        """`kv_storage(num_blocks)` provides the device pool's tensor (a shared-memory arena
        in a compute replica); by default the pool is a private tensor."""
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.cfg = cfg
        self.model_cfg = ModelConfig.from_pretrained(cfg.model)
        self.sizes = pool_sizes(cfg, self.model_cfg)
        self.dtype = self.sizes.dtype
        self.model = load_model(cfg.model, self.model_cfg, self.dtype)
        blocks = self.sizes.device_blocks
        storage = kv_storage(blocks) if kv_storage is not None else None
        self.cache = PagedKVCache(self.model_cfg, blocks, cfg.block_size, self.dtype, storage)
        self.max_model_len = self.sizes.max_model_len
        # auto decode attention: the C++ paged kernel where it builds (CPU), else dense/varlen.
        self._paged = self.cache.kv.device.type == "cpu" and kernels() is not None
        fits = use_prefill_kernel(cfg.prefill_attention, self.cache, self.model_cfg.head_dim)
        self._prefill_kernel = kernels().paged_prefill if fits else None  # type: ignore[union-attr]
        self._generators: dict[str, torch.Generator] = {}

    @property
    def align_by(self) -> str:
        """What a misaligned member costs this runner's decode attention, for the aligned
        policy (`AlignedKnobs.align_by` "auto")."""
        name = self.cfg.attention_backend
        if name == "auto":  # the paged kernel where it builds; else dense/varlen by spread
            return "total" if self._paged else "spread"
        return DECODE_BACKENDS[name].align_by

    def choose_backend(self, kv_lens: list[int]) -> DecodeBackend:
        name = self.cfg.attention_backend
        if name == "auto" and self._paged:
            name = "paged"
        elif name == "auto":
            pad = padding_fraction(kv_lens)
            per_seq = pad * sum(kv_lens) / len(kv_lens)  # mean padded tokens per sequence
            fits = pad <= self.cfg.dense_max_padding or per_seq <= self.cfg.dense_max_pad_tokens
            name = "dense" if fits else "varlen"
        return DECODE_BACKENDS[name]

    def _attention_step(self, chunks: tuple[ScheduledChunk, ...]) -> AttentionStep:
        bs = self.cfg.block_size
        window = self.model_cfg.sliding_window
        blks: list[int] = []
        offs: list[int] = []
        prefills = []
        decodes = [c for c in chunks if c.is_decode]
        row = len(decodes)
        for c in chunks:
            table = c.request.block_ids
            for p in range(c.start, c.end):
                blks.append(table[p // bs])
                offs.append(p % bs)
            if not c.is_decode:
                mask = (None if self._prefill_kernel is not None
                        else prefill_mask(c.start, c.num_new_tokens, window))
                blocks = torch.tensor(table, dtype=torch.long)
                prefills.append(PrefillChunk(row, c.num_new_tokens, c.start, blocks, mask))
                row += c.num_new_tokens
        decode, backend, kv_lens = None, DECODE_BACKENDS["varlen"], [c.end for c in decodes]
        if decodes:
            backend = self.choose_backend(kv_lens)
            tables = [c.request.block_ids[: -(-c.end // bs)] for c in decodes]
            dense = backend.name in ("dense", "flash")  # padded [seqs, max_blocks] tables
            decode = build_decode_batch(tables, kv_lens, bs, window, dense)
        return AttentionStep(
            self.cache, torch.tensor(blks), torch.tensor(offs), len(decodes), decode, backend,
            prefills, self._prefill_kernel, window,
        )

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run the step; chunks must be ordered decodes first (SchedulerOutput's contract)."""
        t0 = time.perf_counter()
        chunks = out.chunks
        ids = torch.tensor(
            [t for c in chunks for t in c.request.token_ids[c.start : c.end]], dtype=torch.long
        )
        positions = torch.tensor([p for c in chunks for p in range(c.start, c.end)])
        attn = self._attention_step(chunks)
        with torch.inference_mode():
            hidden = self.model.forward(ids, positions, attn)
            ends, rows = [], []
            last = -1
            for c in chunks:
                last += c.num_new_tokens
                if c.samples:
                    ends.append(c)
                    rows.append(last)
            sampled: dict[str, int] = {}
            logprobs: dict[str, float] = {}
            if ends:
                logits = self.model.logits(hidden[rows])
                params = [c.request.params for c in ends]
                gens = [self._generator(c.request.request_id, c.request.params.seed) for c in ends]
                res = sample(logits, params, gens)
                for i, c in enumerate(ends):
                    rid = c.request.request_id
                    sampled[rid] = res.token_ids[i]
                    if res.logprobs is not None and c.request.params.logprobs:
                        logprobs[rid] = res.logprobs[i]
        kv_lens = tuple(c.end for c in chunks[: attn.num_decode])
        stats = StepStats(
            seconds=time.perf_counter() - t0,
            num_decode=attn.num_decode,
            num_prefill_tokens=sum(p.q_len for p in attn.prefills),
            backend=attn.backend.name if attn.num_decode else "",
            kv_lens=kv_lens,
            padding=padding_fraction(list(kv_lens)) if attn.backend.name == "dense" else 0.0,
            batch_switch=out.batch_switch,
        )
        return StepResult(sampled, logprobs, stats)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        g = self._generators.get(request_id)
        if g is None:
            g = torch.Generator()
            if seed is None:  # stable across processes, unlike hash()
                seed = zlib.crc32(f"{self.cfg.seed}:{request_id}".encode())
            g.manual_seed(seed)
            self._generators[request_id] = g
        return g

    def release(self, request_id: str) -> None:
        """Forget per-request state (its RNG) once the request has finished."""
        self._generators.pop(request_id, None)
