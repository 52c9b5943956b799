"""Peer systems run in the benchmark's process: plain transformers, static and continuous batching.

Both run the same token-id prompts greedily and count only each request's own requested
tokens as useful output. Times are `time.perf_counter()` seconds since the run started
(the same clock as transformers' continuous-batching timestamps).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from alignedserve.loadgen.report import RequestRecord, SystemRun
from alignedserve.loadgen.workloads import WorkloadRequest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PAD_ID = 0  # any id works: left padding is masked out by the attention mask
_NO_EOS = -1  # an id no model emits, so generation runs to max_new_tokens (ignore_eos)
_GENERATE_LOGGER = "transformers.generation.utils"
_CB_LOGGER = "ContinuousBatchingLogger"


def load_hf_model(model_dir: str | Path, dtype: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=_DTYPES[dtype], attn_implementation=attn
    )
    return model.eval()


class _StepClock(BaseStreamer):
    """A `generate` streamer that only timestamps: put() is called once with the prompt
    (before prefill) and then once per generated token of the whole batch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _left_pad(batch: Sequence[WorkloadRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), _PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        ids[row, width - n :] = torch.tensor(r.prompt_token_ids)
        mask[row, width - n :] = 1
    return ids, mask


def _generate_static(model, batch: Sequence[WorkloadRequest]) -> tuple[torch.Tensor, list[float]]:
    from transformers import GenerationConfig

    clock = _StepClock()
    n_max = max(r.max_tokens for r in batch)
    gen = GenerationConfig(
        max_new_tokens=n_max, min_new_tokens=n_max, do_sample=False,
        pad_token_id=_PAD_ID, eos_token_id=_NO_EOS,
    )
    ids, mask = _left_pad(batch)
    with torch.inference_mode(), _quiet(_GENERATE_LOGGER):
        out = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=gen, streamer=clock
        )
    return out[:, ids.shape[1] :], clock.times


def static_padding_work(batch: Sequence[WorkloadRequest]) -> tuple[int, int]:
    """(real, total) attention KV positions read by the decode steps of one static batch.

    Step j (1-based) attends over width + j - 1 positions in every row; a row only does real
    work while it still needs tokens, and only over its own prompt + generated tokens.
    """
    width = max(len(r.prompt_token_ids) for r in batch)
    n_max = max(r.max_tokens for r in batch)
    real = total = 0
    for j in range(1, n_max):
        total += len(batch) * (width + j)
        real += sum(len(r.prompt_token_ids) + j for r in batch if j < r.max_tokens)
    return real, total


def static_batches(
    requests: Sequence[WorkloadRequest], batch_size: int, max_len: int
) -> list[list[WorkloadRequest]]:
    """FCFS batches of at most `batch_size` whose padded length (longest prompt + longest
    output) stays within `max_len`: a longer padded batch overflows learned positions."""
    batches: list[list[WorkloadRequest]] = []
    cur: list[WorkloadRequest] = []
    for r in requests:
        cand = [*cur, r]
        width = max(len(x.prompt_token_ids) for x in cand) + max(x.max_tokens for x in cand)
        if cur and (len(cand) > batch_size or width > max_len):
            batches.append(cur)
            cand = [r]
        cur = cand
    if cur:
        batches.append(cur)
    return batches


def run_hf_static(
    model_dir: str | Path, dtype: str, requests: Sequence[WorkloadRequest],
    batch_size: int, progress: bool = True,
) -> SystemRun:
    """FCFS static batches of `batch_size`, each run to its longest requested output."""
    model = load_hf_model(model_dir, dtype)
    _generate_static(model, [WorkloadRequest(list(range(32, 40)), 4, 0.0)])  # warm-up
    records: list[RequestRecord] = []
    iters: list[float] = []
    decode_s, decode_tokens, real, total = 0.0, 0, 0, 0
    bar = tqdm(total=len(requests), desc="hf-static", unit="req", disable=not progress)
    t0 = time.perf_counter()
    batches = static_batches(requests, batch_size, model.config.max_position_embeddings)
    for batch in batches:
        tokens, times = _generate_static(model, batch)
        done = time.perf_counter() - t0
        times = [t - t0 for t in times]  # times[0]: before prefill; times[k]: k-th token out
        iters.extend(b - a for a, b in itertools.pairwise(times))
        decode_s += times[-1] - times[1]
        for row, r in enumerate(batch):
            n = min(r.max_tokens, tokens.shape[1])
            decode_tokens += n - 1
            records.append(RequestRecord(
                prompt_len=len(r.prompt_token_ids), requested=r.max_tokens, generated=n,
                arrival_s=r.arrival_s, first_token_s=times[1],
                last_token_s=times[min(n, len(times) - 1)], done_s=done,
                ok=n == r.max_tokens, token_ids=tuple(tokens[row, :n].tolist()),
            ))
        r_work, t_work = static_padding_work(batch)
        real, total = real + r_work, total + t_work
        bar.update(len(batch))
    wall = time.perf_counter() - t0
    bar.close()
    num_batches = len(batches)
    return SystemRun(
        name="hf-static", kind="peer", wall_s=wall, requests=tuple(records),
        decode_tokens=decode_tokens, decode_s=decode_s, iteration_s=tuple(iters),
        padding_pct=100.0 * (1 - real / total) if total else 0.0,
        batch_change_rate=num_batches / len(iters) if iters else None,
        notes=f"transformers generate, FCFS static batches of up to {batch_size} (split where "
        "the padded length would pass the model's positions), left padding, "
        "each batch runs to its longest output; decode time excludes each batch's prefill",
    )


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence known-harmless transformers logs for the duration: the 'eos_token_id should
    be positive' warning (-1 is how we ask for ignore_eos) and the continuous-batching ERROR
    about psutil missing for a memory breakdown (moot once num_blocks is given)."""
    logs = [logging.getLogger(n) for n in names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def run_hf_cb(
    model_dir: str | Path, dtype: str, requests: Sequence[WorkloadRequest], *,
    num_blocks: int, block_size: int, max_batch_tokens: int, max_seqs: int,
    seed: int = 0, progress: bool = True,
) -> SystemRun:
    """transformers continuous batching (paged KV, `sdpa` on CPU) with per-request max tokens.

    num_blocks is given explicitly: left unset, transformers sizes the cache from free memory,
    which on a CPU is all of RAM.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = load_hf_model(model_dir, dtype)
    gen = GenerationConfig(
        max_new_tokens=max(r.max_tokens for r in requests), do_sample=False,
        eos_token_id=_NO_EOS, pad_token_id=_PAD_ID,
    )
    cb = ContinuousBatchingConfig(
        num_blocks=num_blocks, page_size=block_size, max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_seqs, allow_block_sharing=False, auto_switch_to_flash=False,
        use_cuda_graph=False, seed=seed,
    )
    with _quiet(_CB_LOGGER), model.continuous_batching_context_manager(
        generation_config=gen, continuous_batching_config=cb, block=True, timeout=30, warmup=False
    ) as mgr:
        mgr.add_request(list(range(32, 40)), request_id="warmup", max_new_tokens=4)
        _collect_cb(mgr, {"warmup"}, 0.0, None)
        bar = tqdm(total=len(requests), desc="hf-cb", unit="req", disable=not progress)
        t0 = time.perf_counter()
        ids = [f"r{i}" for i in range(len(requests))]
        for rid, r in zip(ids, requests, strict=True):
            mgr.add_request(r.prompt_token_ids, request_id=rid, max_new_tokens=r.max_tokens,
                            record_timestamps=True, eos_token_id=_NO_EOS)
        results = _collect_cb(mgr, set(ids), t0, bar)
        wall = time.perf_counter() - t0
        bar.close()
        fatal = mgr.background_thread_status.fatal_error
        attn = model.config._attn_implementation  # what CB ran with; restored on exit
    records = [_cb_record(r, results.get(rid), t0) for rid, r in zip(ids, requests, strict=True)]
    generated = sum(rec.generated for rec in records)
    return SystemRun(
        name="hf-cb", kind="peer", wall_s=wall, requests=tuple(records),
        decode_tokens=generated, decode_s=None, iteration_s=(), padding_pct=None,
        batch_change_rate=None, error=None if fatal is None else repr(fatal),
        notes=f"transformers generate_batch machinery (ContinuousBatchingManager), attn "
        f"{attn}, num_blocks {num_blocks} x page {block_size}, "
        "per-request max_new_tokens; prefill and decode share steps, so decode throughput "
        "is generated tokens / wall",
    )


def _collect_cb(mgr, pending: set[str], t0: float, bar) -> dict[str, tuple[object, float]]:
    """Wait for every id in `pending`; returns id -> (GenerationOutput, seconds since t0)."""
    results: dict[str, tuple[object, float]] = {}
    while pending - results.keys():
        res = mgr.get_result(timeout=1.0)
        if res is None:
            if not mgr.is_running():
                break  # the generation thread died; the missing requests count as failed
            continue
        if res.is_finished() and res.request_id in pending:
            results[res.request_id] = (res, time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
    return results


def _cb_record(req: WorkloadRequest, got: tuple[object, float] | None, t0: float) -> RequestRecord:
    base = dict(prompt_len=len(req.prompt_token_ids), requested=req.max_tokens,
                arrival_s=req.arrival_s)
    if got is None:
        return RequestRecord(**base, generated=0, first_token_s=None, last_token_s=None,
                             done_s=None, ok=False, token_ids=())
    out, done = got
    tokens = list(out.generated_tokens)[: req.max_tokens]
    stamps = [t - t0 for t in (out.timestamps or [])][: len(tokens)]
    return RequestRecord(
        **base, generated=len(tokens),
        first_token_s=stamps[0] if stamps else None,
        last_token_s=stamps[-1] if stamps else None, done_s=done,
        ok=out.error is None and len(tokens) == req.max_tokens, token_ids=tuple(tokens),
    )
