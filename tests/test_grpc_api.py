"""One Ray Serve deployment that is both the FastAPI (OpenAI HTTP) ingress and the gRPC
service (GrpcApiMixin), over the fake backend: real Ray, real Serve proxies on loopback, the
generated stub with `application` metadata, and disconnects through Serve's HTTP proxy."""

# No `from __future__ import annotations`: Serve's ingress rebinds the methods of `Both`,
# and FastAPI must see the real `Request` class in their signatures, not a string.
import json
import sys
import time

import fake_backend
import httpx
import pytest
from fake_backend import FAIL_SEED, SLOW_SEED, FakeBackend
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from alignedserve.deployments.router.grpc_api import GrpcApiMixin
from alignedserve.deployments.router.openai_api import OpenAIFrontend, install_error_handlers
from alignedserve.engine.tokenizer import final_text, load_tokenizer
from alignedserve.ports import free_port
from alignedserve.scheduling.sampling_params import SamplingParams

APP = "alignedserve"
META = (("application", APP),)
GUARDED = "guarded"
MAX_LEN = 256
SERVICER = "alignedserve.deployments.router.grpc_servicer.add_servicer_to_server"

app = FastAPI()
install_error_handlers(app)


@serve.ingress(app)
class Both(GrpcApiMixin):
    """What the Serve router is, minus Redis: HTTP routes and gRPC methods on one frontend."""

    def __init__(self, model_dir: str, api_key: str | None = None,
                 queue_limit: int | None = None) -> None:
        tok = load_tokenizer(model_dir)
        self.backend = FakeBackend(tok, queue_limit=queue_limit)
        self.frontend = OpenAIFrontend(self.backend, tok, "tiny", MAX_LEN, len(tok),
                                       api_key=api_key)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.frontend.completions(request)

    @app.get("/health")
    async def health(self) -> Response:
        return await self.frontend.health()

    @app.get("/test/aborted")
    async def aborted(self) -> Response:
        return JSONResponse(self.backend.aborted)


@pytest.fixture(scope="module")
def served(tiny_dir):
    import ray
    from ray import cloudpickle
    from ray.serve.config import gRPCOptions

    # The replica cannot import test modules: ship them by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(fake_backend)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dep = serve.deployment(Both, name="Both",
                               ray_actor_options={"num_cpus": 0.1})
        for attempt in range(3):
            # A probed free port can be taken by another process (Ray starts many) before
            # Serve's proxy binds it: then probe again.
            http_port, grpc_port = free_port(), free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                            grpc_options=gRPCOptions(port=grpc_port,
                                                     grpc_servicer_functions=[SERVICER]))
                serve.run(dep.bind(str(tiny_dir)), name=APP, route_prefix="/")
                break
            except Exception as e:
                serve.shutdown()
                if "Failed to bind" not in str(e) or attempt == 2:
                    raise
        # The same service with an API key and room for one request at a time.
        serve.run(dep.options(name="Guarded").bind(str(tiny_dir), api_key="k3y",
                                                   queue_limit=1),
                  name=GUARDED, route_prefix="/guarded")
        yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        serve.shutdown()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        cloudpickle.unregister_pickle_by_value(fake_backend)
        ray.shutdown()


@pytest.fixture(scope="module")
def stub(served):
    import grpc

    from alignedserve.deployments.protos import alignedserve_pb2_grpc as pbg

    with grpc.insecure_channel(served[1]) as ch:
        yield pbg.AlignedServeStub(ch)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def _aborted(base: str, rid: str, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if rid in httpx.get(f"{base}/test/aborted", timeout=10).json():
            return True
        time.sleep(0.1)
    return False


def _drain(call) -> tuple[list, object]:
    """Every message of a streaming call, and the status it ended with."""
    import grpc

    msgs = []
    try:
        for m in call:
            msgs.append(m)
    except grpc.RpcError as e:
        return msgs, e.code()
    return msgs, call.code()


def _story(tok, n: int) -> list[int]:
    story = list(tok.encode(fake_backend.STORY))
    return [story[i % len(story)] for i in range(n)]


def test_generate_streams_chunks_then_complete(stub, tok):
    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    req = pb.GenerateRequest(request_id="g1", text="tell me", sampling=pb.SamplingParams(
        max_tokens=12, temperature=0))
    msgs = list(stub.Generate(req, metadata=META, timeout=60))
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    assert all(m.request_id == "g1" for m in msgs)
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == _story(tok, 12)
    want = final_text(tok, ids, SamplingParams(max_tokens=12))
    assert "".join(c.text for c in chunks) == want
    assert [c.completion_tokens for c in chunks] == sorted(c.completion_tokens for c in chunks)
    assert {c.prompt_tokens for c in chunks} == {len(tok.encode("tell me"))}
    done = msgs[-1]
    assert done.HasField("complete") and done.complete.finish_reason == "length"
    assert done.complete.usage.completion_tokens == 12


def test_generate_from_token_ids_with_a_stop_string(stub, tok):
    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingParams(
        max_tokens=40, stop=["fox"], logprobs=True))
    msgs = list(stub.Generate(req, metadata=META, timeout=60))
    assert msgs[0].request_id.startswith("grpc-")
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    assert text == final_text(tok, ids, SamplingParams(max_tokens=40, stop=("fox",)))
    assert "fox" not in text and msgs[-1].complete.finish_reason == "stop"
    assert len([lp for c in chunks for lp in c.logprobs]) == len(ids)
    assert msgs[-1].complete.usage.prompt_tokens == 3


@pytest.mark.parametrize("req_kw", [
    dict(text="x", sampling=dict(max_tokens=10**6)),
    dict(text=""),
    dict(token_ids=dict(ids=[1, 10**8])),
    dict(text="x", sampling=dict(top_p=0.0)),
])
def test_bad_input_is_one_error_400_and_invalid_argument(stub, req_kw):
    import grpc

    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    msgs, code = _drain(stub.Generate(pb.GenerateRequest(**req_kw), metadata=META, timeout=60))
    assert len(msgs) == 1 and msgs[0].HasField("error")
    assert msgs[0].error.code == 400 and msgs[0].error.message
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_backend_failure_is_an_error_500_after_the_chunks(stub):
    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    req = pb.GenerateRequest(text="x", sampling=pb.SamplingParams(max_tokens=20,
                                                                  seed=FAIL_SEED))
    msgs, code = _drain(stub.Generate(req, metadata=META, timeout=60))
    assert msgs[0].HasField("chunk") and msgs[-1].HasField("error")
    assert msgs[-1].error.code == 500 and "failed" in msgs[-1].error.message
    assert code.name == "INTERNAL"


def test_abort_rpc_ends_a_running_request(stub, served):
    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    call = stub.Generate(pb.GenerateRequest(request_id="g-abort", text="slow", sampling=(
        pb.SamplingParams(max_tokens=200, seed=SLOW_SEED))), metadata=META, timeout=60)
    first = next(call)
    assert first.HasField("chunk")
    resp = stub.Abort(pb.AbortRequest(request_id="g-abort"), metadata=META, timeout=30)
    assert resp.accepted
    rest = list(call)
    assert rest[-1].complete.finish_reason == "abort"
    assert rest[-1].complete.usage.completion_tokens < 200
    assert _aborted(served[0], "g-abort")
    assert stub.Abort(pb.AbortRequest(request_id="never-seen"), metadata=META,
                      timeout=30).accepted


@pytest.mark.parametrize("received", [1, 2, 3, 5, 8, 13])
def test_cancelled_call_aborts_the_request(stub, served, received):
    """Cancels land at varying moments: while Serve's proxy awaits the replica, and while it
    writes to the client (where the proxy alone loses the cancel; see grpc_servicer.py)."""
    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    rid = f"g-cancel-{received}"
    call = stub.Generate(pb.GenerateRequest(request_id=rid, text="slow", sampling=(
        pb.SamplingParams(max_tokens=200, seed=SLOW_SEED))), metadata=META, timeout=60)
    for _ in range(received):
        next(call)
    call.cancel()
    assert _aborted(served[0], rid)


def test_cancelled_call_without_an_id_is_aborted(stub, served):
    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    before = set(httpx.get(f"{served[0]}/test/aborted", timeout=10).json())
    call = stub.Generate(pb.GenerateRequest(text="slow", sampling=pb.SamplingParams(
        max_tokens=200, seed=SLOW_SEED)), metadata=META, timeout=60)
    rid = next(call).request_id
    call.cancel()
    assert rid.startswith("grpc-") and rid not in before and _aborted(served[0], rid)


def test_health_and_server_info(stub):
    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    assert stub.Health(pb.HealthRequest(), metadata=META, timeout=30).healthy
    info = stub.ServerInfo(pb.ServerInfoRequest(), metadata=META, timeout=30)
    assert info.model == "tiny" and info.max_model_len == MAX_LEN and info.uptime_s > 0
    assert info.active_requests >= 0
    assert json.loads(info.backend_json)["replicas"] == 1


def test_the_same_deployment_serves_http(served, tok):
    base = served[0]
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    resp = httpx.post(f"{base}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "hello", "max_tokens": 9})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["text"] == final_text(tok, _story(tok, 9),
                                                    SamplingParams(max_tokens=9))
    assert body["usage"]["completion_tokens"] == 9
    bad = httpx.post(f"{base}/v1/completions", timeout=60, json={"model": "x", "prompt": "a"})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"


def test_http_disconnect_through_serve_aborts_streaming_and_not(served):
    base = served[0]
    body = {"model": "tiny", "prompt": "slow", "max_tokens": 200, "seed": SLOW_SEED,
            "stream": True}
    rid = None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                rid = json.loads(line[6:])["id"]
                break
    assert rid is not None and _aborted(base, rid)

    before = set(httpx.get(f"{base}/test/aborted", timeout=10).json())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = set(httpx.get(f"{base}/test/aborted", timeout=10).json()) - before
        if new:
            break
        time.sleep(0.1)
    assert len(new) == 1


def test_api_key_and_full_queue_have_their_grpc_statuses(stub):
    import grpc

    from alignedserve.deployments.protos import alignedserve_pb2 as pb

    guarded = (("application", GUARDED),)
    req = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=3))
    for meta in (guarded, (*guarded, ("authorization", "Bearer nope"))):
        msgs, code = _drain(stub.Generate(req, metadata=meta, timeout=60))
        assert code == grpc.StatusCode.UNAUTHENTICATED and msgs[0].error.code == 401
        with pytest.raises(grpc.RpcError) as e:
            stub.ServerInfo(pb.ServerInfoRequest(), metadata=meta, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Health(pb.HealthRequest(), metadata=guarded, timeout=30).healthy  # open
    ok = (*guarded, ("authorization", "Bearer k3y"))
    msgs, code = _drain(stub.Generate(req, metadata=ok, timeout=60))
    assert code == grpc.StatusCode.OK and msgs[-1].complete.usage.completion_tokens == 3
    # One slow request fills the queue (limit 1): the next is RESOURCE_EXHAUSTED.
    slow = stub.Generate(pb.GenerateRequest(text="slow", sampling=pb.SamplingParams(
        max_tokens=200, seed=SLOW_SEED)), metadata=ok, timeout=60)
    assert next(slow).HasField("chunk")
    msgs, code = _drain(stub.Generate(req, metadata=ok, timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and msgs[0].error.code == 429
    slow.cancel()
