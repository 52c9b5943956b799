"""Sampling, stopping and detokenization through the real engine on the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignedserve import LLM, SamplingParams
from alignedserve.engine.sampler import filter_probs
from alignedserve.engine.tokenizer import IncrementalDetokenizer, find_stop

PROMPTS = [[5, 9, 200, 31, 77], list(range(40, 90)), [1000, 3, 44] * 7]


@pytest.fixture(scope="module")
def llm(tiny_dir, pools):
    return LLM(str(tiny_dir), **pools)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p, use_tqdm=False)[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=30, seed=5, ignore_eos=True)
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others, p, others],
                           use_tqdm=False)[1].token_ids
    assert alone == batched
    other_seed = llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=99,
                                     ignore_eos=True), use_tqdm=False)[0].token_ids
    assert other_seed != alone


def test_top_k_one_equals_greedy(tiny_dir, pools):
    # fp32: in bf16, logits tie often enough that top-k 1 keeps several tokens (as vLLM's
    # top-k does: every token equal to the k-th is kept) and draws among them.
    llm = LLM(str(tiny_dir), dtype="float32", **pools)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    topk1 = llm.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=20, seed=3),
                         use_tqdm=False)
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **kw: (filter_probs(logits, [SamplingParams(**kw)])[0] > 0).tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 so the 2nd is needed
    assert keep(top_p=0.5) == [True, False, False, False]
    assert keep(min_p=0.25) == [True, True, True, False]  # floor 0.125
    assert keep() == [True, True, True, True]


def test_logprobs_and_timestamps(llm):
    (out,) = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=8, logprobs=True,
                                                       ignore_eos=True), use_tqdm=False)
    assert len(out.logprobs) == len(out.token_ids) == 8
    assert all(lp <= 0.0 for lp in out.logprobs)
    assert len(out.token_times) == 8 and out.token_times == sorted(out.token_times)
    assert out.ttft is not None and out.ttft > 0 and out.first_token_time == out.token_times[0]


def test_stop_string_cuts_text_and_ends_request(llm):
    (ref,) = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=30,
                                                       ignore_eos=True), use_tqdm=False)
    assert len(ref.text) > 6
    stop = ref.text[3:6]
    (out,) = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                       ignore_eos=True), use_tqdm=False)
    assert out.finish_reason == "stop"
    assert out.text == ref.text[: ref.text.find(stop)]
    assert len(out.token_ids) < len(ref.token_ids)
    assert ref.token_ids[: len(out.token_ids)] == out.token_ids
    (kept,) = llm.generate([PROMPTS[2]], SamplingParams(
        temperature=0, max_tokens=30, stop=[stop], include_stop_str_in_output=True,
        ignore_eos=True), use_tqdm=False)
    assert kept.text == ref.text[: ref.text.find(stop) + len(stop)]


def test_ignore_eos_keeps_going_past_eos(tiny_dir, pools, tmp_path):
    base = LLM(str(tiny_dir), **pools)
    (ref,) = base.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=16,
                                                        ignore_eos=True), use_tqdm=False)
    eos = ref.token_ids[5]
    assert eos not in ref.token_ids[:5], "pick a prompt whose 6th token is new"
    d = tmp_path / "tiny-eos"
    shutil.copytree(tiny_dir, d)
    for f in ("config.json", "generation_config.json"):
        cfg = json.loads((d / f).read_text())
        cfg["eos_token_id"] = eos
        (d / f).write_text(json.dumps(cfg))
    llm = LLM(str(d), **pools)
    (stopped,) = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=16),
                              use_tqdm=False)
    assert stopped.token_ids == ref.token_ids[:6] and stopped.finish_reason == "stop"
    (ignored,) = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=16,
                                                           ignore_eos=True), use_tqdm=False)
    assert ignored.token_ids == ref.token_ids and ignored.finish_reason == "length"
    assert eos in ignored.token_ids


def test_incremental_detokenizer_matches_full_decode(llm):
    tok = llm.tokenizer
    ids = tok.encode("Hello wörld — ünïcode ✓ and emoji 🎉 done.")
    d = IncrementalDetokenizer(tok)
    text = "".join(d.push(t) for t in ids)
    assert text == tok.decode(ids)
    assert find_stop("abc STOP def", ("STOP",), 12) == 4
    assert find_stop("abc", ("zz",), 3) is None


def test_bad_inputs_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[10**9]], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.engine.add_request([5, "x"], SamplingParams())
    with pytest.raises(ValueError, match="limit"):
        llm.generate([[5] * 10_000], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="prompts but"):
        llm.generate(PROMPTS, [SamplingParams()], use_tqdm=False)


def test_bfloat16_runs_and_mostly_agrees_with_fp32(tiny_dir, pools):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fp32 = LLM(str(tiny_dir), dtype="float32", **pools).generate(PROMPTS, greedy, use_tqdm=False)
    bf16 = LLM(str(tiny_dir), dtype="bfloat16", **pools).generate(PROMPTS, greedy, use_tqdm=False)
    assert all(len(o.token_ids) == 8 for o in bf16)
    first = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(fp32, bf16, strict=True))
    assert first >= 2, "bf16 should usually pick the same first token as fp32"
