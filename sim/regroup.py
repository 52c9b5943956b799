"""What any regrouping of a run's decode steps could save: a bound on the straggler to win.

The `ceiling` baseline removes the decode straggler for free. A real policy removes it only
by keeping long and short members out of the same step, and when a pair's whole share of a
burst fits its device at once, every member is co-resident from the start whatever the
order. Then the one way left is to split a step in two (the shorter members, then the longer
ones), which reads the weights twice and pays the launch overheads twice.

This replays `system` offline, one pair per shard (round-robin, as `sim run`), and for every
pure-decode step with a straggler prices its members as one step and as the best split at
any length. The sum of (one step - best split, when positive) over the run is what the best
regrouping of those same steps could save. Set beside the straggler itself and the gap to
`ceiling`, it shows how much of that gap is out of any grouping's reach.

    python -m alignedserve.sim.regroup --model opt-2.7b --workload mix95
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alignedserve.sim.cluster import SimPair
from alignedserve.sim.config import SimConfig
from alignedserve.sim.cost_model import CostModel, hardware, model
from alignedserve.sim.run import system_config
from alignedserve.sim.workload import sim_workload


@dataclass(frozen=True)
class RecordingCost(CostModel):
    """A CostModel that keeps the KV lengths of every pure-decode step with a straggler."""

    steps: list[tuple[list[int], float, float]] = field(default_factory=list, compare=False)

    def step_parts(self, decode_lens: list[int], prefill: list[tuple[int, int]]
                   ) -> tuple[float, float]:
        t, straggler = super().step_parts(decode_lens, prefill)
        if straggler > 0 and not prefill:
            self.steps.append((sorted(decode_lens), t, straggler))
        return t, straggler


def best_split_saving(cost: CostModel, lens: list[int], t: float) -> float:
    """One step of `lens` (sorted) costs `t`; what the cheapest split into two steps at any
    length saves (0 when none is cheaper)."""
    best = t
    for cut in range(1, len(lens)):
        best = min(best, cost.step(lens[:cut], []) + cost.step(lens[cut:], []))
    return t - best


def pair_bound(base: SimConfig, system: str, prompt: list[int], output: list[int]
               ) -> dict[str, float]:
    cfg = system_config(base, system, 1, "compute")
    cost = RecordingCost(hardware(cfg.hardware), model(cfg.model), kernel=cfg.kernel)
    pair = SimPair(cfg, cost)
    pair.begin()
    for p, o in zip(prompt, output, strict=True):
        pair.admit(p, o, 0.0)
    while pair.scheduler.has_unfinished():
        pair.step(None)
    plain = CostModel(cost.hw, cost.m, kernel=cost.kernel)
    return {"end_s": pair.now, "straggler_s": sum(s for _, _, s in cost.steps),
            "split_saves_s": sum(best_split_saving(plain, lens, t) for lens, t, _ in cost.steps)}


def regroup(model_name: str, workload: str, systems: tuple[str, ...], num_requests: int,
            gpus: int, seed: int = 0) -> dict[str, Any]:
    base = SimConfig(hardware="h100-sxm", model=model_name, kernel="vllm")
    wl = sim_workload(workload, num_requests, seed=seed)
    rows = []
    for p in tqdm(range(gpus), desc=f"{model_name} {workload}", unit="pair"):
        shard = wl.shard(p, gpus)
        prompt, output = shard.prompt.tolist(), shard.output.tolist()
        row: dict[str, Any] = {"pair": p}
        for system in (*systems, "ceiling"):
            row[system] = pair_bound(base, system, prompt, output)
        rows.append(row)
    return {"model": model_name, "workload": workload, "num_requests": num_requests,
            "pairs": gpus, "seed": seed, "rows": rows}


def markdown(res: dict[str, Any], systems: tuple[str, ...]) -> str:
    head = "| pair | " + " | ".join(
        f"{s} end s / straggler s / best split saves s" for s in systems) + " | ceiling end s |"
    lines = [head, "|---" * (len(systems) + 2) + "|"]
    for r in res["rows"]:
        cells = [f"{r[s]['end_s']:.2f} / {r[s]['straggler_s']:.2f} / {r[s]['split_saves_s']:.3f}"
                 for s in systems]
        lines.append(f"| {r['pair']} | " + " | ".join(cells) + f" | {r['ceiling']['end_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-2.7b")
    ap.add_argument("--workload", default="mix95")
    ap.add_argument("--systems", default="aligned,fcfs-disagg")
    ap.add_argument("--num-requests", type=int, default=1500)
    ap.add_argument("--gpus", type=int, default=8, help="pairs (compute devices)")
    ap.add_argument("--out", type=Path, default=None, help="write results.json and table.md")
    args = ap.parse_args(argv)
    systems = tuple(args.systems.split(","))
    res = regroup(args.model, args.workload, systems, args.num_requests, args.gpus)
    table = markdown(res, systems)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(res, indent=1))
        (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
