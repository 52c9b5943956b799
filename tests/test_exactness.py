"""Greedy decoding must equal transformers' greedy `generate` on the same weights, token
for token, in fp32: for every model family, both decode attention backends, chunked
prefill, and a KV pool small enough to force recompute preemption."""

from __future__ import annotations

import random

import pytest
from hf_reference import hf_greedy

from alignedserve import LLM, SamplingParams

# 16 prompt lengths spread from 8 to 1,500 tokens (roughly geometric).
PROMPT_LENS = [8, 12, 18, 27, 40, 60, 90, 135, 200, 300, 450, 650, 900, 1100, 1300, 1500]
NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)


# KV of all 16 prompts at once (about 8,200 tokens): 16 MiB on the tiny models, about
# 600 MiB on opt-like (72 KiB a token) and 380 MiB on SmolLM2 (46 KiB).
LARGE_KV_GIB = {"opt-like": 0.75, "smollm2-135m": 0.5}


def pools_for(name: str, pools: dict[str, float]) -> dict[str, float]:
    """The tests' small KV pools, grown for the models whose 16 prompts need more."""
    gib = LARGE_KV_GIB.get(name)
    return {"kv_cache_gib": gib, "host_kv_gib": gib} if gib else pools


def random_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in PROMPT_LENS]


def assert_same(outs, refs) -> None:
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert o.token_ids == r, f"prompt {i} (len {len(o.prompt_token_ids)}) diverged"


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-mistral", "opt-like"])
def test_greedy_matches_transformers(model_dirs, pools, name):
    d = model_dirs(name)
    # 512 < 1,500: long prompts are chunked
    llm = LLM(str(d), dtype="float32", max_num_batched_tokens=512, **pools_for(name, pools))
    prompts = random_prompts(llm.engine.model_cfg.vocab_size)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_same(outs, hf_greedy(str(d), tuple(map(tuple, prompts))))
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert sum(len(o.token_ids) for o in outs) > NEW_TOKENS * len(prompts) // 2


@pytest.mark.parametrize("backend", ["paged", "dense", "varlen"])
def test_each_decode_backend_is_exact(tiny_dir, pools, backend):
    llm = LLM(str(tiny_dir), dtype="float32", attention_backend=backend, policy="aligned",
              **pools)
    prompts = random_prompts(llm.engine.model_cfg.vocab_size, seed=1)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_same(outs, hf_greedy(str(tiny_dir), tuple(map(tuple, prompts))))
    # the aligned policy's align_by "auto" follows what a misaligned member costs the kernel
    assert llm.engine.scheduler.cfg.align_by == {"paged": "total", "dense": "spread",
                                                 "varlen": "total"}[backend]


@pytest.mark.parametrize("name", ["tiny", "tiny-mistral"])
def test_preemption_keeps_outputs_exact(model_dirs, name):
    d = model_dirs(name)
    # 110 blocks x 16 = 1,760 tokens: the longest prompt fits, all 16 together do not.
    llm = LLM(str(d), dtype="float32", num_kv_blocks=110, block_size=16,
              max_num_batched_tokens=256)
    prompts = random_prompts(llm.engine.model_cfg.vocab_size)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert sum(o.num_preemptions for o in outs) > 0, "the pool was meant to force preemption"
    assert_same(outs, hf_greedy(str(d), tuple(map(tuple, prompts))))
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks, "every block is free once all requests finish"


def test_a_resumed_request_continues_exactly(tiny_dir, pools):
    """What a worker does for a request whose holder died: recompute prompt + the output
    already streamed, then continue; the whole output equals transformers'."""
    llm = LLM(str(tiny_dir), dtype="float32", max_num_batched_tokens=256, **pools)
    prompts = random_prompts(llm.engine.model_cfg.vocab_size, seed=2)[:8]
    refs = hf_greedy(str(tiny_dir), tuple(map(tuple, prompts)))
    eng = llm.engine
    for i, (p, ref) in enumerate(zip(prompts, refs, strict=True)):
        eng.add_request(p, GREEDY, f"r{i}", output_ids=ref[:3 * i + 1])  # 1..22 tokens in
    outs = {}
    while eng.has_unfinished():
        outs.update((o.request_id, o) for o in eng.step().finished)
    assert_same([outs[f"r{i}"] for i in range(len(prompts))], refs)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(model_dirs, pools):
    d = model_dirs("smollm2-135m")
    llm = LLM(str(d), dtype="float32", max_num_batched_tokens=512,
              **pools_for("smollm2-135m", pools))
    tok = llm.tokenizer
    import inspect
    import json

    corpus = tok.encode(inspect.getsource(json.decoder) + inspect.getsource(json.encoder))
    prompts = [corpus[i * 37 : i * 37 + n] for i, n in enumerate(PROMPT_LENS)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_same(outs, hf_greedy(str(d), tuple(map(tuple, prompts))))
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"]
    (answer,) = llm.generate([list(chat)], SamplingParams(temperature=0, max_tokens=16),
                             use_tqdm=False)
    assert "Paris" in answer.text


@pytest.mark.parametrize("name", ["tiny", "opt-like"])
def test_aligned_policy_matches_transformers(model_dirs, pools, name):
    """The same prompts and knobs as `test_greedy_matches_transformers` (whose default policy
    is fcfs) under the aligned policy, so both policies are checked on each model."""
    d = model_dirs(name)
    llm = LLM(str(d), dtype="float32", policy="aligned", max_num_batched_tokens=512,
              min_batch=4, **pools_for(name, pools))
    prompts = random_prompts(llm.engine.model_cfg.vocab_size)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_same(outs, hf_greedy(str(d), tuple(map(tuple, prompts))))
    assert llm.engine.scheduler.stats().counters["batches"] > 0, "the aligned policy never ran"


@pytest.mark.parametrize("name", ["tiny", "tiny-mistral"])
def test_aligned_exact_under_forced_swaps_and_starvation(model_dirs, pools, name):
    """A device pool barely larger than the longest request, filled to the brim
    (lookahead 0), forces members out to the host pool and back; a 4-step starvation
    horizon makes the bound fire (lengths count under padded attention, `spread`)."""
    d = model_dirs(name)
    llm = LLM(str(d), dtype="float32", policy="aligned", num_kv_blocks=100, block_size=16,
              max_num_batched_tokens=256, align_by="spread",
              max_num_seqs=6, min_batch=3, max_wait_steps=4, lookahead_tokens=0,
              batch_kv_fraction=0.5, host_kv_gib=pools["host_kv_gib"])
    prompts = random_prompts(llm.engine.model_cfg.vocab_size)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_same(outs, hf_greedy(str(d), tuple(map(tuple, prompts))))
    sched, moves = llm.engine.scheduler, llm.engine.transfers.stats
    assert sched.swap.stats.swap_outs > 0 and sched.swap.stats.swap_ins > 0, "no swaps forced"
    assert sched.stats().counters["starved"] > 0, "the starvation bound never fired"
    assert moves.transfers == sched.swap.stats.swap_outs + sched.swap.stats.swap_ins
    assert sched.device.num_free_blocks == 100 and sched.swap.host.num_free == (
        sched.swap.host.num_blocks), "every block is free once all requests finish"
