"""`alignedserve bench peers-serve`: its flags and its command (loadgen/bench_peers_serve.py
does the work)."""

from __future__ import annotations

import argparse
import shlex

from alignedserve.cluster.cli_args import csv_list as _csv
from alignedserve.cluster.cli_args import resolve_model as _resolve_model


def add_peers_serve_parser(bsub: argparse._SubParsersAction) -> None:
    from alignedserve.loadgen.bench_peers_serve import DATASETS
    from alignedserve.loadgen.peer_servers import SERVERS

    ps = bsub.add_parser("peers-serve", help="AlignedServe and vLLM's CPU build as OpenAI "
                         "servers, one after the other, measured by `vllm bench serve` "
                         "(needs `make bench-peers`).")
    ps.add_argument("--model", required=True, help="Model folder or name; both servers "
                    "serve it under the name's basename.")
    ps.add_argument("--datasets", type=_csv, default=DATASETS,
                    help=f"Comma-separated datasets of {','.join(DATASETS)} (default all).")
    ps.add_argument("--servers", type=_csv, default=SERVERS,
                    help=f"Comma-separated servers of {','.join(SERVERS)} (default both).")
    ps.add_argument("--num-prompts", type=int, default=None,
                    help="Requests of every dataset (default 64; --num-requests for mix95 "
                    "and sharegpt).")
    ps.add_argument("--num-requests", type=int, default=64,
                    help="Requests of the mix95 and sharegpt workloads.")
    ps.add_argument("--rate", type=float, default=None,
                    help="mix95/sharegpt: Poisson req/s (default inf: all at t=0).")
    ps.add_argument("--seed", type=int, default=0, help="Workload and vllm bench seed.")
    ps.add_argument("--len-scale", type=float, default=4.0, help="As in bench serve.")
    ps.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="Weights/activations dtype of both servers.")
    ps.add_argument("--warmups", type=int, default=1,
                    help="Unmeasured requests before each run (vllm bench --num-warmups).")
    ps.add_argument("--rounds", type=int, default=1,
                    help="Run every server over every dataset this many times, the order "
                    "reversed every other round; the targets are judged on each ratio's "
                    "median over the rounds (this host drifts between runs).")
    ps.add_argument("--ready-timeout", type=float, default=900.0,
                    help="Seconds a server gets to start and answer.")
    ps.add_argument("--out", default="bench-results/peers-serve", help="Output folder.")
    ps.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    ps.set_defaults(func=_cmd_bench_peers_serve)


def _cmd_bench_peers_serve(args: argparse.Namespace) -> int:
    from alignedserve.loadgen.bench_peers_serve import (
        PeersServeConfig,
        print_summary,
        run_peers_serve,
    )

    folder, label = _resolve_model(args.model)
    cfg = PeersServeConfig(model=folder, label=label, datasets=args.datasets,
                           servers=args.servers, num_prompts=args.num_prompts,
                           num_requests=args.num_requests, rate=args.rate, seed=args.seed,
                           len_scale=args.len_scale, dtype=args.dtype,
                           warmups=args.warmups, out_dir=args.out,
                           ready_timeout_s=args.ready_timeout, rounds=args.rounds,
                           progress=not args.no_progress,
                           command=shlex.join(["alignedserve", *args.argv]))
    print_summary(run_peers_serve(cfg), cfg.out_dir)
    return 0
