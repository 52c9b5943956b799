"""Moving one request's KV into this node's store: cross-node over the KV store's gRPC service
against same-node through shared memory, per request KV length.

    python -m alignedserve.loadgen.kv_pull_bench --models smollm2-135m,opt-like

The "remote" store is a `KVStoreCore` with its gRPC server in a child process (its own GIL,
as on another node); the "local" store is a `KVStoreCore` in this process. Both are sized by
the serving path (`serving_limits(...).pools`: block shape and dtype). For each length the
request's blocks get fresh random data in the remote store, then one path is timed:

- cross-node: allocate local slots, `pull_into` (the stream the multi-node serving path pulls
  with, each block copied into the local arena as it arrives), then the remote `Free`;
- same-node: `index_copy_` of `index_select`ed slots from the source arena into the local
  arena, the prefetch worker's copy (destination slots allocated before the clock starts).

Every copy, warm-ups included, is checked with `torch.equal` against the source; freed local
slots are poisoned with NaN, so stale data from an earlier copy cannot pass. Both processes
run torch with 1 thread, as the worker's transfer thread does.

"Cross-node" here is loopback TCP on one machine: no NIC and no wire, so it is a lower bound
on the network path. The link times of 25 and 12.5 GB/s networks for the same bytes are
printed next to it for context.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignedserve.kv_store.core import KVStoreCore
from alignedserve.kv_store.grpc_service import RemoteKVStoreClient, pull_into, start_server
from alignedserve.kv_store.shm_arena import PREFIX, ArenaSpec, ShmArena
from alignedserve.loadgen.kv_pull_report import LINK_GBPS, PullPoint, markdown, plot

LOOPBACK_NOTE = ("cross-node = the KV store's gRPC service over loopback TCP on one machine "
                 "(no NIC, no wire): a lower bound on the network path's cost")
_START_TIMEOUT_S = 60.0  # the remote store process imports torch and maps its arena


@dataclass(frozen=True)
class KVPullBenchConfig:
    """Everything one run depends on; written verbatim into results.json."""

    models: tuple[str, ...] = ("smollm2-135m",)  # model names or folders; () with block_shape
    lengths: tuple[int, ...] = (128, 512, 2048, 8192)  # request KV lengths, tokens
    repeats: int = 10  # timed copies per length and path
    warmup: int = 1  # untimed (but verified) copies first, per length and path
    block_shape: tuple[int, ...] | None = None  # synthetic block instead of models (tests)
    dtype: str = "float32"  # of the synthetic block
    timeout_s: float = 120.0  # deadline of one pull_into
    seed: int = 0  # random KV data
    out_dir: str = "bench-results/kv-pull"
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        if self.block_shape is not None and len(self.block_shape) != 5:
            raise ValueError("block_shape is [layers, 2, block_size, kv_heads, head_dim]")
        if (self.block_shape is None) == (not self.models):
            raise ValueError("give models or a synthetic block_shape, not both")


@dataclass(frozen=True)
class BlockLayout:
    label: str  # model name, or "synthetic"
    block_shape: tuple[int, ...]  # [layers, K|V, block_size, kv_heads, head_dim]
    dtype: torch.dtype
    max_tokens: int | None  # the serving path's context cap; longer lengths are skipped

    @property
    def block_size(self) -> int:
        return self.block_shape[2]

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * torch.tensor([], dtype=self.dtype).element_size()


def model_layout(model: str) -> BlockLayout:
    """The block the node's KV store holds for `model`, sized as the serving path sizes it."""
    from alignedserve.config import ServeConfig
    from alignedserve.deployments.limits import serving_limits
    from alignedserve.model_zoo.model_builder import ensure_model

    folder = Path(model) if Path(model).is_dir() else ensure_model(model)
    lim = serving_limits(ServeConfig(model=str(folder)), str(folder))
    return BlockLayout(Path(model).name, lim.pools.block_shape, lim.pools.dtype,
                       lim.max_model_len)


def _remote_store_main(conn: Connection, name: str, num_blocks: int,
                       block_shape: tuple[int, ...], dtype: str) -> None:
    """The child process: the remote store and its gRPC server until the parent says stop
    (or goes away: EOF)."""
    torch.set_num_threads(1)
    try:
        core = KVStoreCore(name, num_blocks, block_shape, getattr(torch, dtype))
        running = start_server(core, threading.Lock(), "127.0.0.1", 0)
    except Exception as e:
        conn.send(("error", repr(e)))
        raise
    try:
        conn.send(("ready", running.port, core.spec()))
        with contextlib.suppress(EOFError):
            conn.recv()
    finally:
        running.server.stop(grace=None).wait()
        core.close()


@contextlib.contextmanager
def remote_store(num_blocks: int, layout: BlockLayout) -> Iterator[tuple[str, ArenaSpec]]:
    """(gRPC address, arena spec) of a store in a child process, stopped on exit."""
    ctx = mp.get_context("spawn")  # no fork: grpc and torch threads
    conn, child_conn = ctx.Pipe()
    name = f"{PREFIX}kv-pull-remote-{uuid.uuid4().hex[:8]}"
    dtype = str(layout.dtype).removeprefix("torch.")
    proc = ctx.Process(target=_remote_store_main, name="kv-pull-remote-store", daemon=True,
                       args=(child_conn, name, num_blocks, layout.block_shape, dtype))
    proc.start()
    child_conn.close()
    try:
        if not conn.poll(_START_TIMEOUT_S):
            raise RuntimeError(f"the remote store did not start in {_START_TIMEOUT_S:g} s")
        try:
            msg = conn.recv()
        except EOFError:
            raise RuntimeError(f"the remote store exited with code {proc.exitcode}") from None
        if msg[0] != "ready":
            raise RuntimeError(f"the remote store failed: {msg[1]}")
        yield f"127.0.0.1:{msg[1]}", msg[2]
    finally:
        with contextlib.suppress(OSError):  # BrokenPipeError: it is gone already
            conn.send("stop")
        conn.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()


@dataclass
class _Stores:
    remote: RemoteKVStoreClient  # the child's store, over gRPC
    source: ShmArena  # the child's arena mapped here: the test harness fills it directly
    local: KVStoreCore  # this node's store: every copy lands in its arena


def _fill_remote(st: _Stores, rid: str, data: torch.Tensor) -> list[int]:
    slots = st.remote.allocate(rid, len(data))
    if slots is None:
        raise RuntimeError(f"the remote store has no room for {len(data)} blocks")
    st.source.blocks.index_copy_(0, torch.tensor(slots, dtype=torch.long), data)
    return slots


def _cross_node(st: _Stores, rid: str, num_blocks: int, timeout_s: float
                ) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    slots = st.local.allocate(rid, num_blocks)
    if slots is None:
        raise RuntimeError(f"the local store has no room for {num_blocks} blocks")
    pull_into(st.remote, rid, num_blocks, st.local.arena.blocks, slots, timeout_s)
    st.remote.free(rid)
    return time.perf_counter() - t0, slots


def _same_node(st: _Stores, rid: str, src_slots: list[int]) -> tuple[float, list[int]]:
    slots = st.local.allocate(rid, len(src_slots))
    if slots is None:
        raise RuntimeError(f"the local store has no room for {len(src_slots)} blocks")
    t0 = time.perf_counter()
    src = torch.tensor(src_slots, dtype=torch.long)
    dst = torch.tensor(slots, dtype=torch.long)
    st.local.arena.blocks.index_copy_(0, dst, st.source.blocks.index_select(0, src))
    seconds = time.perf_counter() - t0
    st.remote.free(rid)
    return seconds, slots


def verify_and_release(local: KVStoreCore, rid: str, slots: list[int], data: torch.Tensor,
                       what: str) -> None:
    """Raise unless `rid`'s copy in `local` equals `data`; then poison (NaN) and free its
    slots, so a later copy that writes nothing cannot pass."""
    idx = torch.tensor(slots, dtype=torch.long)
    if not torch.equal(local.arena.blocks.index_select(0, idx), data):
        raise RuntimeError(f"{what}: the copied blocks differ from the source")
    local.arena.blocks.index_fill_(0, idx, float("nan"))
    local.free(rid)


def bench_length(cfg: KVPullBenchConfig, layout: BlockLayout, st: _Stores, kv_tokens: int,
                 bar: tqdm) -> PullPoint:
    n = math.ceil(kv_tokens / layout.block_size)
    samples: dict[str, list[float]] = {"cross": [], "same": []}
    verified = 0
    for rep in range(cfg.warmup + cfg.repeats):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + kv_tokens * 101 + rep)
        data = torch.randn((n, *layout.block_shape), generator=gen).to(layout.dtype)
        for path in ("same", "cross") if rep % 2 == 0 else ("cross", "same"):
            rid = f"kv-pull-{kv_tokens}-{rep}-{path}"
            src_slots = _fill_remote(st, rid, data)
            if path == "cross":
                seconds, slots = _cross_node(st, rid, n, cfg.timeout_s)
            else:
                seconds, slots = _same_node(st, rid, src_slots)
            verify_and_release(st.local, rid, slots, data,
                               f"{layout.label} {kv_tokens} tokens {path}")
            verified += 1
            if rep >= cfg.warmup:
                samples[path].append(seconds * 1e3)
        bar.update(1)
    return _point(layout, kv_tokens, n, samples, verified)


def _point(layout: BlockLayout, kv_tokens: int, n: int, samples: dict[str, list[float]],
           verified: int) -> PullPoint:
    nbytes = n * layout.block_bytes
    q = {path: {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90))}
         for path, ms in samples.items()}
    cross, same = q["cross"]["p50"], q["same"]["p50"]
    return PullPoint(
        model=layout.label, kv_tokens=kv_tokens, blocks=n, bytes=nbytes,
        cross_ms=q["cross"], same_ms=q["same"],
        cross_gbps=nbytes / cross / 1e6, same_gbps=nbytes / same / 1e6,
        cross_over_same=cross / same, added_ms=cross - same,
        link_ms={f"{g:g} GB/s": nbytes / g / 1e6 for g in LINK_GBPS},
        verified_copies=verified, samples_ms={k: [round(x, 4) for x in v]
                                              for k, v in samples.items()})


def bench_layout(cfg: KVPullBenchConfig, layout: BlockLayout, lengths: list[int],
                 bar: tqdm) -> list[PullPoint]:
    n_max = math.ceil(max(lengths) / layout.block_size)
    with remote_store(n_max, layout) as (address, spec), contextlib.ExitStack() as stack:
        local = KVStoreCore(f"{PREFIX}kv-pull-local-{uuid.uuid4().hex[:8]}", n_max,
                            layout.block_shape, layout.dtype)
        stack.callback(local.close)
        remote = RemoteKVStoreClient(address)
        stack.callback(remote.close)
        source = ShmArena.attach(spec)
        stack.callback(source.close)  # before the child unlinks it
        st = _Stores(remote, source, local)
        points = []
        for kv_tokens in lengths:
            bar.set_description(f"{layout.label} {kv_tokens} tok")
            points.append(bench_length(cfg, layout, st, kv_tokens, bar))
        return points


def run_kv_pull_bench(cfg: KVPullBenchConfig, command: str = "") -> dict:
    """Run every model and length; write results.json and results.png into cfg.out_dir and
    return what results.json holds."""
    from alignedserve.loadgen.hw_bounds import machine_info

    info = machine_info()  # before our own load shows in loadavg
    if info["loadavg_1m"] > 1.0:
        print(f"warning: load average {info['loadavg_1m']:.1f} before the run; other "
              "processes skew every number", file=sys.stderr)
    if cfg.block_shape is not None:
        layouts = [BlockLayout("synthetic", cfg.block_shape, getattr(torch, cfg.dtype), None)]
    else:
        layouts = [model_layout(m) for m in cfg.models]
    plan = [(lay, [n for n in cfg.lengths if lay.max_tokens is None or n <= lay.max_tokens])
            for lay in layouts]
    bar = tqdm(total=sum(len(ls) for _, ls in plan) * (cfg.warmup + cfg.repeats),
               unit="rep", disable=not cfg.progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker's transfer thread (and the child process)
    try:
        with bar:
            points = [p for lay, ls in plan if ls for p in bench_layout(cfg, lay, ls, bar)]
    finally:
        torch.set_num_threads(threads)
    payload = {
        "benchmark": "kv-pull", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command, "config": asdict(cfg), "machine": info, "note": LOOPBACK_NOTE,
        "layouts": {lay.label: {
            "block_shape": list(lay.block_shape), "dtype": str(lay.dtype).removeprefix("torch."),
            "block_bytes": lay.block_bytes, "max_tokens": lay.max_tokens,
            "skipped_lengths": [n for n in cfg.lengths if n not in ls]} for lay, ls in plan},
        "points": [asdict(p) for p in points],
    }
    from alignedserve.loadgen.report import write_json

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", payload)
    plot(points, out / "results.png")
    return payload


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m",
                    help="Comma-separated model names or folders (block shape and dtype as "
                         "the serving path sizes them).")
    ap.add_argument("--lengths", type=_ints, default=(128, 512, 2048, 8192),
                    help="Request KV lengths, tokens, comma-separated.")
    ap.add_argument("--repeats", type=int, default=10, help="Timed copies per length and path.")
    ap.add_argument("--warmup", type=int, default=1, help="Untimed copies first.")
    ap.add_argument("--block-shape", type=_ints, default=None,
                    help="Synthetic block layers,2,block_size,kv_heads,head_dim instead of "
                         "--models (tests).")
    ap.add_argument("--dtype", default="float32", help="dtype of --block-shape.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the random KV data.")
    ap.add_argument("--out", default="bench-results/kv-pull", help="Output folder.")
    ap.add_argument("--no-progress", action="store_true", help="No progress bar.")
    args = ap.parse_args(argv)
    cfg = KVPullBenchConfig(
        models=() if args.block_shape else tuple(args.models.split(",")),
        lengths=args.lengths, repeats=args.repeats,
        warmup=args.warmup, block_shape=args.block_shape, dtype=args.dtype, seed=args.seed,
        out_dir=args.out, progress=not args.no_progress)
    argv_used = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "alignedserve.loadgen.kv_pull_bench", *argv_used])
    data = run_kv_pull_bench(cfg, command)
    print(markdown(data["points"]))
    print(f"\nnote: {LOOPBACK_NOTE}. The link columns are bytes / link rate alone, no "
          f"protocol or copies. Every copy was checked against its source "
          f"({sum(p['verified_copies'] for p in data['points'])} copies).")
    print(f"wrote {Path(cfg.out_dir) / 'results.json'} and {Path(cfg.out_dir) / 'results.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
