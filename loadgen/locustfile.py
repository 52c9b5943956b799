"""Locust load test of a running AlignedServe: an OpenAI HTTP user (streaming completions and
chat) and a gRPC user (`Generate` stream), both reporting TTFT, TPOT and ITL as locust
request events next to the request itself.

    locust -f loadgen/locustfile.py --headless -u 4 -r 2 --run-time 60s \\
        --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:9000 --model smollm2-135m

(`make locust` runs that and writes CSV and HTML reports into bench-results/locust/.)

Events, per user type (`HTTP` or `gRPC` as locust's request type):
- `completions` / `chat` / `Generate`: the whole request (arrival to the last message);
  response_length is the completion tokens the server reported.
- `ttft`: time to the first message carrying output; `tpot`: (last - first output message) /
  (completion tokens - 1), one per request with >= 2 tokens; `itl`: every gap between
  consecutive output messages (a message may carry more than one token).

Prompts are `loadgen/workloads.py` requests (token ids, seeded), capped by --max-prompt-tokens
and --max-tokens so a CPU server keeps up. Chat needs text: the prompts are decoded once at
start-up with the model's tokenizer (--tokenizer, a folder or a built-in model name), never
inside a timed loop. Every request sets ignore_eos so outputs have the workload's lengths.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel: gRPC's I/O must yield to gevent

import grpc  # noqa: E402
import requests  # noqa: E402
from locust import User, between, events, task  # noqa: E402

from alignedserve.deployments.protos import alignedserve_pb2 as pb  # noqa: E402
from alignedserve.deployments.protos import alignedserve_pb2_grpc as pb_grpc  # noqa: E402
from alignedserve.loadgen.workloads import WORKLOAD_NAMES, make_workload  # noqa: E402

GRPC_METADATA = (("application", "alignedserve"),)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("AlignedServe")
    g.add_argument("--model", default="smollm2-135m", env_var="ALIGNEDSERVE_LOCUST_MODEL",
                   help="Served model name (the `model` field of each request).")
    g.add_argument("--tokenizer", default="", env_var="ALIGNEDSERVE_LOCUST_TOKENIZER",
                   help="Model folder or built-in name whose tokenizer decodes the prompts "
                   "for chat; default: --model.")
    g.add_argument("--grpc-target", default="127.0.0.1:9000", env_var="ALIGNEDSERVE_LOCUST_GRPC",
                   help="host:port of the gRPC API.")
    g.add_argument("--workload", default="mix95", choices=WORKLOAD_NAMES,
                   env_var="ALIGNEDSERVE_LOCUST_WORKLOAD", help="Workload of the prompts.")
    g.add_argument("--num-prompts", type=int, default=256, help="Distinct prompts, cycled.")
    g.add_argument("--seed", type=int, default=0, help="Workload seed.")
    g.add_argument("--max-prompt-tokens", type=int, default=256,
                   env_var="ALIGNEDSERVE_LOCUST_MAX_PROMPT", help="Prompt length cap.")
    g.add_argument("--max-tokens", type=int, default=64, env_var="ALIGNEDSERVE_LOCUST_MAX_TOKENS",
                   help="Output length cap.")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="Seconds one request may take.")


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # workload token ids, capped at --max-prompt-tokens
    text: str  # the same ids decoded once, for chat
    max_tokens: int  # output tokens to generate (ignore_eos)


class Prompts:
    """The run's prompts, built once per locust process and shared by its users."""

    _lock = threading.Lock()
    _built: list[Prompt] | None = None

    @classmethod
    def get(cls, options) -> list[Prompt]:
        with cls._lock:
            if cls._built is None:
                cls._built = _build_prompts(options)
            return cls._built


def _load_tokenizer(name: str):
    from alignedserve.engine.tokenizer import load_tokenizer

    if Path(name).is_dir():
        return load_tokenizer(name)
    from alignedserve.model_zoo.model_builder import ensure_model

    return load_tokenizer(ensure_model(name))


def _build_prompts(options) -> list[Prompt]:
    tok = _load_tokenizer(options.tokenizer or options.model)
    reqs = make_workload(options.workload, options.num_prompts, len(tok), seed=options.seed)
    out = []
    for r in reqs:
        ids = r.prompt_token_ids[:options.max_prompt_tokens]
        out.append(Prompt(ids, tok.decode(ids, skip_special_tokens=True),
                          max(1, min(r.max_tokens, options.max_tokens))))
    return out


class StreamTimer:
    """Times one streamed request and fires its locust events."""

    def __init__(self, user: User, kind: str, name: str) -> None:
        self.fire = user.environment.events.request.fire
        self.kind, self.name = kind, name
        self.start = time.perf_counter()
        self.output_at: list[float] = []  # perf_counter of each message carrying output

    def output(self) -> None:
        self.output_at.append(time.perf_counter())

    def _event(self, name: str, seconds: float, length: int = 0,
               exc: BaseException | None = None) -> None:
        self.fire(request_type=self.kind, name=name, response_time=seconds * 1000.0,
                  response_length=length, exception=exc, context={})

    def done(self, completion_tokens: int) -> None:
        end = time.perf_counter()
        t = self.output_at
        if not t:
            self.failed(RuntimeError("the stream ended without output"))
            return
        self._event(self.name, end - self.start, completion_tokens)
        self._event("ttft", t[0] - self.start)
        if completion_tokens >= 2:
            self._event("tpot", (t[-1] - t[0]) / (completion_tokens - 1))
        for a, b in itertools.pairwise(t):
            self._event("itl", b - a)

    def failed(self, exc: BaseException) -> None:
        self._event(self.name, time.perf_counter() - self.start, 0, exc)


class OpenAIHTTPUser(User):
    """Streams /v1/completions (token-id prompts) and /v1/chat/completions (text) over SSE."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.prompts = Prompts.get(self.environment.parsed_options)
        self.session = requests.Session()
        self.opts = self.environment.parsed_options
        self.i = 0

    def on_stop(self) -> None:
        self.session.close()

    def _next(self) -> Prompt:
        self.i += 1
        return self.prompts[self.i % len(self.prompts)]

    @task
    def completions(self) -> None:
        p = self._next()
        self._stream("completions", "/v1/completions", {"prompt": p.ids}, p)

    @task
    def chat(self) -> None:
        p = self._next()
        self._stream("chat", "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": p.text}]}, p)

    def _stream(self, name: str, path: str, body: dict, p: Prompt) -> None:
        body = {**body, "model": self.opts.model, "max_tokens": p.max_tokens,
                "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        timer = StreamTimer(self, "HTTP", name)
        usage = None
        try:
            with self.session.post(self.host.rstrip("/") + path, json=body, stream=True,
                                   timeout=self.opts.request_timeout) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith(b"data: {"):
                        continue
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        raise RuntimeError(msg["error"].get("message", msg["error"]))
                    if msg.get("usage"):
                        usage = msg["usage"]
                    choice = (msg.get("choices") or [{}])[0]
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        timer.output()
            if usage is None:
                raise RuntimeError("no usage chunk (stream_options.include_usage)")
        except Exception as e:  # every failure becomes a locust failure event
            timer.failed(e)
            return
        timer.done(usage["completion_tokens"])


class GrpcUser(User):
    """Streams alignedserve.v1.AlignedServe/Generate with token-id prompts."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.opts = self.environment.parsed_options
        self.prompts = Prompts.get(self.opts)
        self.channel = grpc.insecure_channel(self.opts.grpc_target)
        self.stub = pb_grpc.AlignedServeStub(self.channel)
        self.i = 0

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def generate(self) -> None:
        self.i += 1
        p = self.prompts[self.i % len(self.prompts)]
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=p.ids), sampling=pb.SamplingParams(
            max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True))
        timer = StreamTimer(self, "gRPC", "Generate")
        completion_tokens = None
        try:
            for msg in self.stub.Generate(req, metadata=GRPC_METADATA,
                                          timeout=self.opts.request_timeout):
                kind = msg.WhichOneof("response")
                if kind == "chunk" and msg.chunk.token_ids:
                    timer.output()
                elif kind == "complete":
                    completion_tokens = msg.complete.usage.completion_tokens
                elif kind == "error":
                    raise RuntimeError(f"{msg.error.code}: {msg.error.message}")
            if completion_tokens is None:
                raise RuntimeError("the stream ended without Complete")
        except Exception as e:  # grpc.RpcError included
            timer.failed(e)
            return
        timer.done(completion_tokens)
