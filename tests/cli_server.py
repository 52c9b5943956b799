"""`alignedserve serve` as a real subprocess on loopback, for the tests that need the whole
server as users run it (its own Redis and Ray): start it, wait for /health, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from alignedserve.ports import free_port


@dataclass
class CliServer:
    proc: subprocess.Popen
    base: str  # http://127.0.0.1:<port>
    grpc: str  # 127.0.0.1:<port>
    log: Path  # its stdout and stderr (a file: a pipe nobody reads would block it)
    redis_url: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM (drain, then Serve, Ray and its Redis stop); its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_cli_server(model_dir: Path, workdir: Path, prefix: str, *extra: str,
                     env: dict[str, str] | None = None, redis_url: str | None = None,
                     timeout_s: float = 240, config: str = "",
                     new_session: bool = False) -> CliServer:
    """A tiny-pool server on free ports (and its own Redis unless `redis_url` answers);
    returns once /health is 200 (raises if it exits or does not come up in time).
    `config`: more YAML lines for its config file; `new_session`: its own process group
    (to signal the whole group, as `docker stop` does)."""
    http, grpc_port = free_port(), free_port()
    redis_url = redis_url or f"redis://127.0.0.1:{free_port()}/0"
    cfg = workdir / "serve.yaml"
    cfg.write_text("served_model_name: tiny\nhost_kv_gib: 0.05\n"
                   f"redis_prefix: \"{prefix}\"\n{config}")
    if "engine:" not in config:
        cfg.write_text(cfg.read_text() + "engine:\n  kv_cache_gib: 0.02\n  dtype: float32\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignedserve.cluster.cli", "serve", "--config", str(cfg),
         "--model", str(model_dir), "--http-port", str(http), "--grpc-port", str(grpc_port),
         "--redis-url", redis_url, *extra],
        stdout=(workdir / "server.log").open("w"), stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})}, start_new_session=new_session)
    server = CliServer(proc, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}",
                       workdir / "server.log", redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{server.output()}")
            try:
                if httpx.get(f"{server.base}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not come up")
            time.sleep(1)
    except BaseException:
        server.kill()
        raise
