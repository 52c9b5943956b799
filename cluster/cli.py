"""The `alignedserve` command line: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from alignedserve.cluster.bench_peers_cli import add_peers_serve_parser
from alignedserve.cluster.cli_args import csv_list as _csv
from alignedserve.cluster.cli_args import resolve_model as _resolve_model
from alignedserve.sim.cost_model import KERNELS


def _add_model_parser(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="Build and manage local model folders.")
    msub = model.add_subparsers(dest="model_cmd", required=True, metavar="ACTION")
    init = msub.add_parser("init", help="Build a named model into an HF-format folder.")
    init.add_argument("name", help="Model name (see alignedserve.model_zoo.model_builder).")
    init.add_argument("--out", required=True, help="Output folder (replaced if it exists).")
    init.add_argument("--seed", type=int, default=0,
                      help="Weight seed of the random-weight models (default 0).")
    init.set_defaults(func=_cmd_model_init)


def _add_aligned_flags(p: argparse.ArgumentParser, extra: Sequence[tuple[str, type, str]] = ()
                       ) -> None:
    """The aligned policy's knobs as flags, generated from `AlignedKnobs` (unset = its
    default), plus `extra` (flag, type, help) of the command."""
    from alignedserve.scheduling.aligned_config import knob_flags

    for flag, kind, what in (*knob_flags(), *extra):
        p.add_argument(flag, type=kind, default=None, help=what)


def _aligned_overrides(args: argparse.Namespace, extra: Sequence[str] = ()
                       ) -> tuple[tuple[str, float], ...]:
    """(knob, value) of the knob flags (and `extra` names) the user set."""
    from alignedserve.scheduling.aligned_config import AlignedKnobs

    names = [*AlignedKnobs.model_fields, *extra]
    return tuple((n, getattr(args, n)) for n in names if getattr(args, n, None) is not None)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="Run benchmarks.")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True, metavar="KIND")
    off = bsub.add_parser(
        "offline", help="Offline throughput: all requests at t=0, engine policies vs peers."
    )
    off.add_argument("--model", required=True,
                     help="Model folder, or a model name (built on first use).")
    off.add_argument("--workload", default="mix95",
                     help="Workload name: mix95, mix70, sharegpt, longbench, azure-conv.")
    off.add_argument("--policy", "--policies", dest="policies", type=_csv, default=("fcfs",),
                     help="Comma-separated engine policies; the first is the baseline.")
    off.add_argument("--peers", type=_csv, default=("hf-static", "hf-cb"),
                     help="Comma-separated peers (hf-static, hf-cb, vllm, vllm-reserved; "
                     "vllm needs `make bench-peers`) or 'none'.")
    off.add_argument("--num-requests", type=int, default=64, help="Requests in the workload.")
    off.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="Weights/activations dtype for the engine and the peers.")
    off.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    off.add_argument("--out", default=None,
                     help="Output folder (default bench-results/<model>-<workload>).")
    off.add_argument("--seed", type=int, default=0, help="Workload seed.")
    off.add_argument("--len-scale", type=float, default=4.0,
                     help="Divide the paper's lengths by this (4 = WORKLOADS.md table).")
    off.add_argument("--hf-batch-size", type=int, default=8, help="hf-static batch size.")
    off.add_argument("--kv-cache-gib", type=float, default=1.0,
                     help="KV pool size in GiB for the engine and hf-cb.")
    off.add_argument("--max-num-seqs", type=int, default=64,
                     help="Requests per step at most (engine and hf-cb).")
    off.add_argument("--max-num-batched-tokens", type=int, default=1024,
                     help="Tokens per step at most (engine and hf-cb).")
    off.add_argument("--rate", type=float, default=None,
                     help="Online mode: Poisson arrivals at this many requests/s (engine "
                     "policies only, --peers none). Default: offline, all at t=0.")
    off.add_argument("--repeats", type=int, default=1,
                     help="Rounds of the engine policies, in reversed order every other "
                     "round (A B, B A, ...); results.json keeps every round, the table each "
                     "policy's median round. For telling a small difference from this host's "
                     "noise.")
    _add_aligned_flags(off, [("--host-kv-gib", float, "aligned: host KV pool size in GiB "
                              "(default: EngineConfig's)")])
    off.add_argument("--no-hw-probe", action="store_true",
                     help="Skip the memory-bandwidth / GEMM / batch-1 decode measurements.")
    off.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    off.set_defaults(func=_cmd_bench_offline)
    table = bsub.add_parser("table", help="Markdown table from results.json files.")
    table.add_argument("files", nargs="+", help="results.json files of bench runs.")
    table.set_defaults(func=_cmd_bench_table)
    step = bsub.add_parser(
        "step", help="Decode step time vs KV-length spread within a batch (aligned vs mixed)."
    )
    step.add_argument("--model", required=True,
                      help="Model folder, or a model name (built on first use).")
    step.add_argument("--batch", type=int, default=32, help="Requests per decode batch.")
    step.add_argument("--mean-kv", type=int, default=256, help="Mean KV length of a batch.")
    step.add_argument("--steps", type=int, default=6, help="Decode steps timed per point.")
    step.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    step.add_argument("--out", default="bench-results/step", help="Output folder.")
    step.set_defaults(func=_cmd_bench_step)
    srv = bsub.add_parser("serve", help="Serving overhead: the Serve path (HTTP, Redis, "
                          "replicas) against the in-process engine, same workload.")
    srv.add_argument("--model", required=True, help="Model folder or name.")
    srv.add_argument("--workload", default="mix95", help="Workload name.")
    srv.add_argument("--num-requests", type=int, default=128, help="Requests in the workload.")
    srv.add_argument("--rate", type=float, default=None, help="Online: Poisson req/s.")
    srv.add_argument("--len-scale", type=float, default=4.0, help="As in bench offline.")
    srv.add_argument("--num-replicas", type=int, default=1, help="Compute replicas.")
    srv.add_argument("--kv-cache-gib", type=float, default=2.0, help="Device KV pool GiB.")
    srv.add_argument("--replica-threads", type=int, default=1,
                     help="torch threads per compute replica.")
    srv.add_argument("--worker-threads", type=int, default=1,
                     help="torch threads per prefetch worker.")
    srv.add_argument("--out", default=None, help="Output folder.")
    srv.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    srv.set_defaults(func=_cmd_bench_serve)
    add_peers_serve_parser(bsub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignedserve", description="AlignedServe tools.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _add_model_parser(sub)
    _add_bench_parser(sub)
    _add_sim_parser(sub)
    from alignedserve.cluster.serve import add_serve_parsers

    add_serve_parsers(sub)
    return parser


def _add_sim_parser(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("sim", help="Simulate GPU clusters with the real scheduling policies.")
    ssub = sim.add_subparsers(dest="sim_cmd", required=True, metavar="KIND")
    run = ssub.add_parser("run", help="One workload through aligned / fcfs / the ablation.")
    run.add_argument("--hardware", default="h100-sxm",
                     help="Hardware profile (sim/profiles/hardware.json), e.g. h100-sxm; "
                     "a suffix xN (h100x8) sets --gpus.")
    run.add_argument("--gpus", type=int, default=8,
                     help="GPUs per system: fcfs = N replicas, aligned = N/2 pairs.")
    run.add_argument("--model", default="opt-13b", help="Model profile (sim/profiles/models.json).")
    run.add_argument("--workload", default="mix95", help="mix95, mix70, sharegpt, longbench, "
                     "azure-conv.")
    run.add_argument("--num-requests", type=int, default=2000, help="Requests in the workload.")
    run.add_argument("--len-scale", type=float, default=1.0, help="1 = the paper's lengths.")
    run.add_argument("--rate", type=float, default=None, help="Online: Poisson req/s.")
    run.add_argument("--seed", type=int, default=0, help="Workload seed.")
    run.add_argument("--policies", "--systems", dest="systems", type=_csv,
                     default=("aligned", "fcfs", "aligned-noprefetch"),
                     help="Systems: aligned, fcfs, aligned-noprefetch, and the baselines "
                     "fcfs-disagg, fcfs-sorted, ceiling.")
    run.add_argument("--router", choices=("round-robin", "dispatch"), default="round-robin",
                     help="How requests reach pairs: round-robin shards (pairs simulated "
                     "independently, --workers applies) or the deployed global dispatch "
                     "(scheduling/dispatch.py, all pairs in one event loop).")
    run.add_argument("--pairs-per-node", type=int, default=None,
                     help="--router dispatch: pairs per node (pair j on node j // N; unset = "
                     "all on one node). A request decoded on another node than the one that "
                     "prefilled it first pulls its KV over the network (sim/nodes.py).")
    run.add_argument("--internode-gbps", type=float, default=None,
                     help="--router dispatch, several nodes: each node's network link, GB/s "
                     "per direction (default 25 = 200 Gb/s).")
    run.add_argument("--kernel", choices=KERNELS,
                     default="v1", help="Decode attention model (sim/cost_model.py): v1 = "
                     "PagedAttention V1's Graham bound, vllm = vLLM's V1/V2 dispatch, split = "
                     "load-balanced split-KV, fluid = max(total, longest unit), none = no "
                     "straggler.")
    run.add_argument("--split-kv", dest="kernel", action="store_const", const="split",
                     help="Same as --kernel split.")
    run.add_argument("--parity", choices=("gpus", "compute"), default="gpus",
                     help="gpus: every system gets --gpus devices (aligned = N/2 pairs); "
                     "compute: every system gets --gpus compute devices.")
    run.add_argument("--workers", type=int, default=1,
                     help="Processes simulating pairs in parallel (results are identical).")
    _add_knob_args(run)
    run.set_defaults(func=_cmd_sim_run)
    plan = ssub.add_parser("plan", help="Cheapest pair count and knobs meeting a P99 TPOT SLO.")
    plan.add_argument("--model", required=True, help="Model profile, e.g. opt-13b.")
    plan.add_argument("--workload", required=True, help="mix95, mix70, sharegpt, longbench, "
                      "azure-conv.")
    plan.add_argument("--slo-tpot-ms", type=float, required=True, help="P99 TPOT target, ms.")
    plan.add_argument("--rate", type=float, required=True, help="Cluster-wide requests/s.")
    plan.add_argument("--hardware", default="h100-sxm", help="Hardware profile.")
    plan.add_argument("--len-scale", type=float, default=1.0, help="1 = the paper's lengths.")
    plan.add_argument("--per-pair", type=int, default=300,
                      help="Requests simulated per candidate (one pair's shard).")
    plan.set_defaults(func=_cmd_sim_plan)
    cap = ssub.add_parser("capacity", help="Highest Poisson rate each system sustains with "
                          "P99 TPOT within an SLO (one pair, compute parity).")
    cap.add_argument("--model", default="opt-13b", help="Model profile.")
    cap.add_argument("--hardware", default="h100-sxm", help="Hardware profile.")
    cap.add_argument("--workload", default="sharegpt", help="mix95, mix70, sharegpt, ...")
    cap.add_argument("--slo-tpot-ms", type=float, default=50.0, help="P99 TPOT target, ms.")
    cap.add_argument("--kernel", choices=KERNELS,
                     default="vllm", help="Decode attention model (see sim run).")
    cap.add_argument("--num-requests", type=int, default=300, help="Arrivals per try.")
    cap.add_argument("--len-scale", type=float, default=1.0, help="1 = the paper's lengths.")
    cap.add_argument("--policies", "--systems", dest="systems", type=_csv,
                     default=("aligned", "fcfs", "fcfs-disagg", "fcfs-sorted", "ceiling"),
                     help="Systems, as in sim run.")
    _add_knob_args(cap)
    cap.set_defaults(func=_cmd_sim_capacity)
    cal = ssub.add_parser("calibrate", help="Fit the cpu-local step model to the real "
                          "engine's per-iteration traces; report held-out error.")
    cal.add_argument("--model", default="smollm2-135m", help="Model folder or name.")
    cal.add_argument("--num-requests", type=int, default=48, help="Requests per trace run.")
    cal.add_argument("--threads", type=int, default=2, help="torch threads of the engine.")
    cal.add_argument("--out", default="docs/sim/calibration", help="Report folder.")
    cal.set_defaults(func=_cmd_sim_calibrate)


def _add_knob_args(p: argparse.ArgumentParser) -> None:
    """Simulator knobs: the aligned ones (clocks in simulated seconds; the paper's Kmin is
    --min-batch 36) and the sim's own limits (unset = SimConfig's defaults)."""
    _add_aligned_flags(p, [
        ("--max-num-batched-tokens", int, "Tokens (decode + prefill chunks) per step at most."),
        ("--host-pool-gib", float, "aligned: host KV pool per pair, GiB.")])


def _cmd_model_init(args: argparse.Namespace) -> int:
    from alignedserve.model_zoo.model_builder import build_model

    print(build_model(args.name, args.out, seed=args.seed))
    return 0


def _cmd_bench_offline(args: argparse.Namespace) -> int:
    from alignedserve.loadgen.bench_offline import OfflineBenchConfig, run_offline_bench

    folder, label = _resolve_model(args.model)
    cfg = OfflineBenchConfig(
        model=folder, label=label, workload=args.workload, num_requests=args.num_requests,
        seed=args.seed, len_scale=args.len_scale, dtype=args.dtype, threads=args.threads,
        policies=args.policies, peers=args.peers, hf_batch_size=args.hf_batch_size,
        kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, hw_probe=not args.no_hw_probe,
        aligned=_aligned_overrides(args, ["host_kv_gib"]), rate=args.rate,
        repeats=args.repeats,
        out_dir=args.out, progress=not args.no_progress,
        command=shlex.join(["alignedserve", *args.argv]),
    )
    result = run_offline_bench(cfg)
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0


def _cmd_bench_table(args: argparse.Namespace) -> int:
    from alignedserve.loadgen.bench_table import markdown

    print(markdown(args.files))
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from alignedserve.loadgen.bench_serve import ServeBenchConfig, print_summary, run_serve_bench

    folder, label = _resolve_model(args.model)
    cfg = ServeBenchConfig(model=folder, label=label, workload=args.workload,
                           num_requests=args.num_requests, rate=args.rate,
                           len_scale=args.len_scale, num_replicas=args.num_replicas,
                           kv_cache_gib=args.kv_cache_gib, out_dir=args.out,
                           replica_threads=args.replica_threads,
                           worker_threads=args.worker_threads,
                           progress=not args.no_progress,
                           command=shlex.join(["alignedserve", *args.argv]))
    print_summary(run_serve_bench(cfg))
    return 0


def _cmd_bench_step(args: argparse.Namespace) -> int:
    from alignedserve.loadgen.bench_step import run

    folder, _ = _resolve_model(args.model)
    points = run(folder, batch=args.batch, mean_kv=args.mean_kv, steps=args.steps,
                 threads=args.threads, out=args.out)
    for p in points:
        print(f"{p.spread:>12} {p.backend:>7}: {p.step_ms_p50:8.1f} ms/step "
              f"(max KV {p.max_kv}, padding {p.padding:.0%})")
    print(f"wrote {args.out}/results.json and {args.out}/results.png")
    return 0


def _cmd_sim_run(args: argparse.Namespace) -> int:
    import resource
    import time

    from alignedserve.sim.config import SimConfig
    from alignedserve.sim.run import print_table, run_sim

    hw, gpus = args.hardware, args.gpus
    if "x" in hw and hw.rsplit("x", 1)[1].isdigit():  # h100x8 -> h100-sxm, 8 GPUs
        short, n = hw.rsplit("x", 1)
        hw, gpus = {"h100": "h100-sxm", "a100": "a100-80g"}.get(short, short), int(n)
    knobs = dict(_aligned_overrides(args, ["max_num_batched_tokens", "host_pool_gib",
                                           "pairs_per_node", "internode_gbps"]))
    base = SimConfig(hardware=hw, model=args.model, kernel=args.kernel,
                     router=args.router, **knobs)
    t0 = time.perf_counter()
    res = run_sim(base, args.workload, args.num_requests, gpus, tuple(args.systems),
                  seed=args.seed, len_scale=args.len_scale, rate=args.rate,
                  parity=args.parity, workers=args.workers, progress=True)
    wall = time.perf_counter() - t0
    mode = "offline" if args.rate is None else f"{args.rate:g} req/s"
    print_table(res, f"{args.model} on {gpus} x {hw} ({args.parity} parity) / {args.workload} "
                     f"len_scale {args.len_scale:g} / {args.num_requests} requests, {mode} "
                     "(simulated)")
    events = sum(s["events"] for s in res.values())
    rss = max(resource.getrusage(who).ru_maxrss
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2**10
    print(f"wall {wall:.1f} s, {events:,} events ({events / wall:,.0f} events/s), "
          f"peak RSS {rss:,.0f} MiB per process")
    return 0


def _cmd_sim_plan(args: argparse.Namespace) -> int:
    from alignedserve.sim.plan import PlanRequest, describe, plan

    req = PlanRequest(args.model, args.workload, args.slo_tpot_ms, args.rate,
                      hardware=args.hardware, len_scale=args.len_scale,
                      per_pair=args.per_pair)
    best, found = plan(req)
    print(f"{args.model} / {args.workload} at {args.rate:g} req/s, P99 TPOT <= "
          f"{args.slo_tpot_ms:g} ms on {args.hardware}; smallest meeting count per knob set:")
    for c in found:
        print("  " + describe(c))
    if best is None:
        print("no configuration meets the SLO within the search range")
        return 1
    print("cheapest: " + describe(best))
    return 0


def _cmd_sim_capacity(args: argparse.Namespace) -> int:
    from alignedserve.sim.config import SimConfig
    from alignedserve.sim.plan import capacity

    knobs = dict(_aligned_overrides(args, ["max_num_batched_tokens", "host_pool_gib"]))
    base = SimConfig(hardware=args.hardware, model=args.model, kernel=args.kernel, **knobs)
    print(f"{args.model} on {args.hardware} / {args.workload}: highest Poisson rate with "
          f"P99 TPOT <= {args.slo_tpot_ms:g} ms, one pair ({args.kernel} kernel model)")
    for system in args.systems:
        c = capacity(base, system, args.workload, args.slo_tpot_ms, args.num_requests,
                     len_scale=args.len_scale)
        print(f"  {system:<12} {c.rate:7.2f} req/s per pair, {c.per_gpu:7.2f} per GPU; "
              f"P99 TPOT {c.tpot_p99_ms:6.1f} ms, P99 TTFT {c.ttft_p99_s:6.2f} s")
    return 0


def _cmd_sim_calibrate(args: argparse.Namespace) -> int:
    from alignedserve.sim.calibrate import calibrate

    folder, label = _resolve_model(args.model)
    res = calibrate(folder, label, Path(args.out), args.num_requests, args.threads)
    for row in res["rows"]:
        print(f"{row['split']:>9} {row['trace']:<24} {row['steps']:>6} steps  median |err| "
              f"{row['median_abs_pct']:5.1f}%  p90 {row['p90_abs_pct']:5.1f}%")
    print(f"held-out median |error|: {res['held_out_median_abs_pct']:.1f}% "
          f"(wrote {args.out}/calibration.json, .png and sim/profiles/cpu-local.json)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except ValueError as exc:  # bad names or values from the user: message, not traceback
        print(f"alignedserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
