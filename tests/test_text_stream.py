"""Streamed text deltas concatenate to the engine's final text, stop strings included."""

from __future__ import annotations

import random

import pytest

from alignedserve.deployments.router.openai_protocol import (
    APIError,
    CompletionRequest,
    to_sampling_params,
)
from alignedserve.deployments.router.text_stream import TextStream
from alignedserve.engine.tokenizer import final_text, load_tokenizer
from alignedserve.scheduling.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def _stream(tok, ids: list[int], params: SamplingParams, step: int) -> str:
    ts = TextStream(tok, params)
    out = [ts.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    return "".join(out) + ts.finish()


@pytest.mark.parametrize("seed", range(6))
def test_deltas_concatenate_to_final_text(tok, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(3, tok.vocab_size) for _ in range(60)]
    full = tok.decode(ids, skip_special_tokens=True)
    a = rng.randrange(5, len(full) - 6)
    stops = [(), (full[a:a + 3],), (full[a:a + 4], "zzzz-never"), ("never",)]
    for stop in stops:
        for include in (False, True):
            p = SamplingParams(max_tokens=60, stop=stop, include_stop_str_in_output=include)
            want = final_text(tok, ids, p)
            for step in (1, 3):
                assert _stream(tok, ids, p, step) == want
            if stop and stop[0] in full:
                assert want.endswith(stop[0]) == include


def test_completion_request_validation():
    req = CompletionRequest(model="m", prompt="x", max_tokens=5, temperature=0, stop="a")
    sp = to_sampling_params(req, prompt_len=10, max_model_len=100)
    assert (sp.max_tokens, sp.temperature, sp.stop) == (5, 0.0, ("a",))
    dflt = to_sampling_params(CompletionRequest(model="m", prompt="x"), 10, 100)
    assert dflt.max_tokens == 90  # the rest of the context, as vLLM
    for bad, param in ((dict(n=3), "n"), (dict(max_tokens=91), "max_tokens"),
                       (dict(repetition_penalty=1.2), "repetition_penalty"),
                       (dict(logprobs=5), "logprobs"), (dict(top_p=0.0), "top_p")):
        with pytest.raises(APIError) as e:
            to_sampling_params(CompletionRequest(model="m", prompt="x", **bad), 10, 100)
        assert e.value.status == 400 and e.value.param == param
