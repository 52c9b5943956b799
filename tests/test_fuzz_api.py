"""schemathesis against the OpenAI front end's own OpenAPI schema (request bodies from the
pydantic models): whatever it sends, the server answers without a 5xx, and every error is
`{"error": {...}}` in the OpenAI format. In process over ASGI, with a fake backend that
generates quickly (no slow or failing seeds), so the run is bounded."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from fake_backend import FakeBackend

from alignedserve.deployments.router.backend import GenerateRequest, TokenEvent
from alignedserve.deployments.router.openai_api import OpenAIFrontend, create_app
from alignedserve.engine.tokenizer import load_tokenizer

MODEL = "tiny"


class PlainBackend(FakeBackend):
    """The fake backend without its special seeds: fuzzed seeds must not pick the
    deliberately slow or failing behaviours."""

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        params = dataclasses.replace(req.params, seed=None)
        return super().generate(dataclasses.replace(req, params=params))


def _schema(tiny_dir: Path):
    tok = load_tokenizer(tiny_dir)
    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    frontend = OpenAIFrontend(PlainBackend(tok), tok, MODEL, 256, vocab)
    app = create_app(frontend, metrics_text=lambda: "alignedserve:demo 1\n")
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _error_format(response) -> None:
    """Every 4xx/5xx body is {"error": {"message", "type", "param", "code"}}."""
    if response.status_code < 400:
        return
    body = response.json()
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err), body
    assert isinstance(err["message"], str) and err["message"], body


def _served_model(case):
    """Bodies name the served model, so the fuzzer gets past the 404 (tested elsewhere) into
    the parameters."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
    return case


@pytest.mark.slow
def test_no_input_makes_a_server_error_and_every_error_is_openai_shaped(tiny_dir):
    schema = _schema(tiny_dir)
    ops = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in ops}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= paths
    statuses: dict[str, set[int]] = {}
    for op in ops:
        body_ops = op.path.startswith("/v1/") and op.method.upper() == "POST"

        @hypothesis.given(case=op.as_strategy().map(_served_model))
        @hypothesis.settings(max_examples=80 if body_ops else 5, deadline=None,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             database=None)
        def run(case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.body, response.text[:500])
            _error_format(response)
            statuses.setdefault(case.operation.path, set()).add(response.status_code)

        run()
    # The fuzzer reached both outcomes on the generation routes (a check that it ran).
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert any(s < 300 for s in statuses[path]) and any(s >= 400 for s in statuses[path]), (
            path, statuses[path])
