"""The OpenAI front end over a fake backend, served by a real uvicorn on loopback and driven
by the official `openai` client (and raw httpx for what the client hides)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from fake_backend import FAIL_SEED, OVERLOAD_SEED, SLOW_SEED, FakeBackend

from alignedserve.deployments.router.openai_api import OpenAIFrontend, create_app
from alignedserve.engine.tokenizer import final_text, load_tokenizer

MODEL = "tiny"
MAX_LEN = 256


class RecordingMetrics:
    """Stands in for FrontendMetrics (which needs Ray): keeps what the front end records."""

    def __init__(self) -> None:
        self.done: list[tuple] = []

    def request_done(self, *args) -> None:
        self.done.append(args)


class Served:
    def __init__(self, base: str, backend: FakeBackend, tok, metrics: RecordingMetrics):
        self.base, self.backend, self.tok, self.metrics = base, backend, tok, metrics
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                                    timeout=30)

    def want(self, rid: str) -> str:
        """What the in-process engine would return for the ids the backend emitted."""
        return final_text(self.tok, self.backend.outputs[rid], self.backend.submitted[rid].params)

    def wait_aborted(self, rid: str, timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if rid in self.backend.aborted:
                return True
            time.sleep(0.05)
        return False


@contextlib.contextmanager
def _serve(tiny_dir, **frontend_kw):
    """A real uvicorn server on loopback over the fake backend (`frontend_kw`: api_key,
    and the backend's queue_limit)."""
    import uvicorn

    tok = load_tokenizer(tiny_dir)
    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    backend = FakeBackend(tok, queue_limit=frontend_kw.pop("queue_limit", None))
    metrics = RecordingMetrics()
    frontend = OpenAIFrontend(backend, tok, MODEL, MAX_LEN, vocab, metrics, **frontend_kw)
    app = create_app(frontend, metrics_text=lambda: "alignedserve:demo 1\n")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", backend, tok, metrics)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def srv(tiny_dir):
    with _serve(tiny_dir) as served:
        yield served


# "fox" completes twice in the story; " said:" spans tokens; "zzz" never appears.
STOPS = [None, "fox", [" said:", "zzz"], ["zzz"]]


@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("include", [False, True])
def test_completions_stream_equals_non_stream(srv, stop, include):
    kw = dict(model=MODEL, prompt="tell me a story", max_tokens=40, temperature=0, stop=stop,
              extra_body={"include_stop_str_in_output": include})
    full = srv.client.completions.create(**kw)
    text = full.choices[0].text
    assert text == srv.want(full.id)
    n_prompt = len(srv.tok.encode("tell me a story"))
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.completion_tokens == len(srv.backend.outputs[full.id])
    assert full.usage.total_tokens == n_prompt + full.usage.completion_tokens
    stopped = stop not in (None, ["zzz"])
    assert full.choices[0].finish_reason == ("stop" if stopped else "length")
    if stopped:
        first = stop if isinstance(stop, str) else stop[0]
        assert text.endswith(first) == include and text.count(first) == int(include)

    chunks = list(srv.client.completions.create(**kw, stream=True,
                                                stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    body = chunks[:-1]
    assert "".join(c.choices[0].text for c in body) == text
    assert [c.choices[0].finish_reason for c in body][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert all(c.object == "text_completion" and c.id.startswith("cmpl-") for c in chunks)


@pytest.mark.parametrize("stop", [None, "fox"])
def test_chat_stream_equals_non_stream(srv, stop):
    messages = [{"role": "system", "content": "You tell stories."},
                {"role": "user", "content": [{"type": "text", "text": "A story, "},
                                             {"type": "text", "text": "please."}]}]
    kw = dict(model=MODEL, messages=messages, max_completion_tokens=30, temperature=0,
              stop=stop)
    full = srv.client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content == srv.want(full.id)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    assert full.model == MODEL and full.created > 0
    prompt = srv.backend.submitted[full.id].prompt_token_ids
    assert full.usage.prompt_tokens == len(prompt)
    assert full.usage.completion_tokens == len(srv.backend.outputs[full.id])
    assert srv.tok.decode(list(prompt)).count("please.") == 1  # the text parts were joined

    chunks = list(srv.client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    content = [c for c in chunks[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in content) == msg.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_without_include_usage_has_no_usage_chunk(srv):
    with httpx.stream("POST", f"{srv.base}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": [5, 6, 7], "max_tokens": 5, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = "".join(resp.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert all(b["choices"] and "usage" not in b for b in bodies)
    assert "".join(b["choices"][0]["text"] for b in bodies) == srv.want(bodies[0]["id"])


def test_defaults_and_client_fields_vllm_bench_sends(srv):
    ids = [11, 12, 13, 14]
    resp = httpx.post(f"{srv.base}/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": ids, "ignore_eos": True, "repetition_penalty": 1.0,
        "presence_penalty": 0, "top_k": -1, "user": "u", "some_future_field": {"x": 1}})
    assert resp.status_code == 200, resp.text
    req = srv.backend.submitted[resp.json()["id"]]
    assert req.prompt_token_ids == tuple(ids)
    assert req.params.max_tokens == MAX_LEN - len(ids)  # the rest of the context, as vLLM
    assert req.params.ignore_eos and req.params.top_k == 0
    assert resp.json()["usage"]["completion_tokens"] == MAX_LEN - len(ids)


def test_logprobs_of_the_sampled_tokens(srv):
    chat = srv.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, logprobs=True)
    lps = chat.choices[0].logprobs.content
    assert len(lps) == chat.usage.completion_tokens == 6
    assert all(lp.logprob < 0 and lp.top_logprobs == [] for lp in lps)
    cmpl = srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=5, logprobs=1)
    assert len(cmpl.choices[0].logprobs.token_logprobs) == 5
    plain = srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=5)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                           "content": "hi"}], logprobs=True, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_openai_client_raises_the_right_errors(srv):
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model=MODEL, prompt="x", n=2)
    assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        srv.client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"


BAD = [
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "repetition_penalty": 1.3}, 400, "repetition_penalty"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 10**9]}, 400, "prompt"),
    ({"prompt": [5] * MAX_LEN}, 400, "prompt"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_completion_requests(srv, body, status, param):
    resp = httpx.post(f"{srv.base}/v1/completions", json={"model": MODEL, **body}, timeout=30)
    err = resp.json()["error"]
    assert resp.status_code == status, err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": MAX_LEN},
     "max_tokens"),
])
def test_bad_chat_requests(srv, body, param):
    resp = httpx.post(f"{srv.base}/v1/chat/completions", json={"model": MODEL, **body},
                      timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_bodies_are_400_in_openai_format(srv, raw):
    resp = httpx.post(f"{srv.base}/v1/chat/completions", content=raw, timeout=30,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method_are_openai_errors(srv):
    resp = httpx.get(f"{srv.base}/v1/engines", timeout=30)
    assert resp.status_code == 404 and "message" in resp.json()["error"]
    resp = httpx.get(f"{srv.base}/v1/completions", timeout=30)
    assert resp.status_code == 405 and "message" in resp.json()["error"]


def test_backend_failure_mid_stream_and_not(srv):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "seed": FAIL_SEED}
    resp = httpx.post(f"{srv.base}/v1/completions", json=body, timeout=30)
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["type"] == "server_error" and "failed" in err["message"]
    with httpx.stream("POST", f"{srv.base}/v1/completions", json={**body, "stream": True},
                      timeout=30) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["error"]["type"] == "server_error" and "failed" in last["error"]["message"]
    assert len(lines) >= 3  # at least one text chunk came before the failure


def test_an_overloaded_backend_is_a_503(srv):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 5, "seed": OVERLOAD_SEED}
    resp = httpx.post(f"{srv.base}/v1/completions", json=body, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "overloaded"
    with pytest.raises(openai.APIStatusError) as e:
        srv.client.completions.create(**body)
    assert e.value.status_code == 503
    with httpx.stream("POST", f"{srv.base}/v1/completions", json={**body, "stream": True},
                      timeout=30) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert json.loads(lines[0][6:])["error"]["code"] == "overloaded"
    assert lines[-1] == "data: [DONE]"


def test_models_health_and_metrics_routes(srv):
    models = srv.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    resp = httpx.get(f"{srv.base}/health", timeout=10)
    assert resp.status_code == 200
    resp = httpx.get(f"{srv.base}/metrics", timeout=10)
    assert resp.status_code == 200 and "alignedserve:demo 1" in resp.text


def test_finished_requests_are_recorded_in_metrics(srv):
    before = len(srv.metrics.done)
    srv.client.completions.create(model=MODEL, prompt="count me", max_tokens=7)
    ttft, gaps, e2e, n_prompt, n_out, reason = srv.metrics.done[before]
    assert ttft is not None and 0 <= ttft <= e2e
    assert len(gaps) >= 1 and all(g >= 0 for g in gaps)
    assert (n_prompt, n_out, reason) == (len(srv.tok.encode("count me")), 7, "length")


def _slow_rid(srv, prompt: str) -> str:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for rid, req in list(srv.backend.submitted.items()):
            if srv.tok.decode(list(req.prompt_token_ids)) == prompt:
                return rid
        time.sleep(0.05)
    raise AssertionError(f"{prompt!r} never reached the backend")


@pytest.mark.parametrize("chat", [False, True])
def test_disconnect_mid_stream_aborts(srv, chat):
    if chat:
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "bye"}]}
    else:
        url, body = "/v1/completions", {"prompt": "bye"}
    body.update(model=MODEL, max_tokens=200, seed=SLOW_SEED, stream=True)
    rid = None
    with httpx.stream("POST", f"{srv.base}{url}", json=body, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                rid = json.loads(line[6:])["id"]
                if len(srv.backend.outputs.get(rid, ())) >= 3:
                    break  # leaving the block closes the connection mid-stream
    assert rid is not None and srv.wait_aborted(rid)
    assert len(srv.backend.outputs[rid]) < 200


def test_disconnect_while_waiting_for_a_non_streamed_response_aborts(srv):
    prompt = "a slow non-streamed request"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 200, "seed": SLOW_SEED}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.base}/v1/completions", json=body, timeout=1.5)
    rid = _slow_rid(srv, prompt)
    assert srv.wait_aborted(rid)
    assert len(srv.backend.outputs[rid]) < 200


def test_api_key_guards_the_openai_routes_but_not_health_or_metrics(tiny_dir):
    with _serve(tiny_dir, api_key="s3cret") as srv:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
        for method, path, kw in (("POST", "/v1/completions", {"json": body}),
                                 ("POST", "/v1/chat/completions", {"json": {
                                     "model": MODEL, "messages": [
                                         {"role": "user", "content": "hi"}]}}),
                                 ("GET", "/v1/models", {})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                resp = httpx.request(method, srv.base + path, headers=headers, timeout=30, **kw)
                assert resp.status_code == 401, (path, headers, resp.text)
                assert resp.json()["error"]["code"] == "invalid_api_key"
        assert not srv.backend.submitted  # nothing reached the backend
        ok = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(**body).usage.completion_tokens == 3
        assert [m.id for m in ok.models.list().data] == [MODEL]
        assert httpx.get(f"{srv.base}/health", timeout=30).status_code == 200
        assert httpx.get(f"{srv.base}/metrics", timeout=30).status_code == 200


def test_a_full_queue_is_a_429_with_retry_after_before_any_stream_starts(tiny_dir):
    with _serve(tiny_dir, queue_limit=2) as srv:
        slow = {"model": MODEL, "prompt": "slow", "max_tokens": 200, "seed": SLOW_SEED,
                "stream": True}
        with httpx.stream("POST", f"{srv.base}/v1/completions", json=slow, timeout=60) as a, \
                httpx.stream("POST", f"{srv.base}/v1/completions", json=slow, timeout=60) as b:
            assert a.status_code == b.status_code == 200
            lines = a.iter_lines(), b.iter_lines()  # (dropping one closes its stream)
            for it in lines:
                next(it)  # both admitted and generating
            assert srv.backend.inflight == 2
            for stream in (False, True):
                resp = httpx.post(f"{srv.base}/v1/completions", timeout=30,
                                  json={**slow, "stream": stream})
                assert resp.status_code == 429, resp.text
                assert resp.headers["Retry-After"] == "2"
                err = resp.json()["error"]
                assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="x", max_retries=0)
        # The two streams closed: their requests are aborted and the queue has room again.
        deadline = time.monotonic() + 15
        while srv.backend.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage
