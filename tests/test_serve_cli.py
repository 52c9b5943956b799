"""`alignedserve serve` as users run it: a subprocess that starts its own Redis and Ray,
answers on loopback, and on SIGTERM drains an in-flight stream before exiting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_answers_and_drains_on_sigterm(tiny_dir, tmp_path):
    http, grpc_port, redis_port = _port(), _port(), _port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("served_model_name: tiny\nhost_kv_gib: 0.05\nengine:\n  kv_cache_gib: 0.02\n"
                   "redis_prefix: \"cli-test:\"\n")
    env = {**os.environ, "ALIGNEDSERVE_DRAIN_TIMEOUT_S": "30"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignedserve.cluster.cli", "serve", "--config", str(cfg),
         "--model", str(tiny_dir), "--http-port", str(http), "--grpc-port", str(grpc_port),
         "--redis-url", f"redis://127.0.0.1:{redis_port}/0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(1)
        body = {"model": "tiny", "prompt": "drain me", "max_tokens": 120, "temperature": 0,
                "ignore_eos": True, "stream": True}
        chunks, reason = 0, None
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                msg = json.loads(line[6:])
                assert "error" not in msg, msg
                chunks += 1
                if chunks == 3:
                    proc.send_signal(signal.SIGTERM)  # drain starts while we stream
                reason = msg["choices"][0]["finish_reason"] or reason
        assert reason == "length"  # the in-flight request finished during the drain
        assert proc.wait(timeout=120) == 0
        out = proc.stdout.read()
        assert "OpenAI HTTP" in out and "draining" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
