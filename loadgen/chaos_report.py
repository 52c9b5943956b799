"""The fault suite's report (`make chaos`): tests/test_chaos.py writes one JSON row per
fault; this prints them as the RELIABILITY table of BENCHMARKS.md.

    python -m alignedserve.loadgen.chaos_report bench-results/chaos/reliability.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (row key in the report, what "recovered" means for it) in the order faults happen.
RECOVERY = {
    "compute replica kill -9": ("longest_stall_s", "longest stream pause of a request it held"),
    "prefetch worker kill -9": ("longest_stall_s", "longest stream pause of a request it held"),
    "redis-server kill -9": ("new_requests_served_after_s", "kill to a new request served"),
    "router kill -9": ("cleaned_up_after_s", "kill to its requests aborted, KV freed"),
    "10x burst": (None, "429 with Retry-After beyond the queue bound"),
    "SIGTERM to the process group": ("exited_after_s", "signal to exit (Redis stopped)"),
}


def markdown(report: dict[str, dict]) -> str:
    lines = ["| fault | in flight | lost | failed with an error | identical to fault-free "
             "| recovery | what recovery measures |", "|---|---|---|---|---|---|---|"]
    for fault, row in report.items():
        key, meaning = RECOVERY.get(fault, (None, ""))
        failed = row.get("failed_with_an_error", row.get("refused_429", 0))
        same = row.get("identical", row.get("finished", row.get("accepted_and_completed")))
        rec = f"{row[key]} s" if key and key in row else "-"
        lines.append(f"| {fault} | {row['in_flight']} | {row.get('lost', 0)} | {failed} | "
                     f"{same} | {rec} | {meaning} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    args = ap.parse_args()
    report = json.loads(args.report.read_text())
    print(markdown(report))
    print()
    for fault, row in report.items():
        print(f"- {fault}: " + ", ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
