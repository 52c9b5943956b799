"""sim/regroup.py: the bound on what splitting co-resident decode steps could save."""

from __future__ import annotations

import pytest

from alignedserve.sim.config import SimConfig
from alignedserve.sim.cost_model import CostModel, hardware, model
from alignedserve.sim.regroup import best_split_saving, pair_bound, regroup


def _cost(kernel: str) -> CostModel:
    return CostModel(hardware("h100-sxm"), model("opt-2.7b"), kernel=kernel)


def test_a_split_saves_only_where_the_straggler_costs_more_than_a_second_step():
    vllm = _cost("vllm")
    uniform = [800] * 150
    assert best_split_saving(vllm, uniform, vllm.step(uniform, [])) == 0.0
    # one 8,100-token member in a big batch: V1, its straggler ~4 ms; alone (one sequence,
    # fewer than 512 units) it takes V2, so a second step can pay for itself
    mixed = [800] * 150 + [8100]
    t, straggler = vllm.step_parts(mixed, [])
    saving = best_split_saving(vllm, mixed, t)
    assert 0.0 < saving < straggler
    assert saving == pytest.approx(t - vllm.step(uniform, []) - vllm.step([8100], []))
    # under V1 for every batch size the long member alone still pays its straggler
    v1 = _cost("v1")
    assert best_split_saving(v1, mixed, v1.step(mixed, [])) == 0.0


def test_the_bound_replays_a_pair_and_the_ceiling_has_no_straggler():
    base = SimConfig(hardware="h100-sxm", model="opt-2.7b", kernel="vllm")
    prompt, output = [300] * 40 + [6000] * 2, [40] * 42
    got = pair_bound(base, "fcfs-disagg", prompt, output)
    assert got["straggler_s"] > 0 and 0 <= got["split_saves_s"] < got["straggler_s"]
    ceiling = pair_bound(base, "ceiling", prompt, output)
    assert ceiling["straggler_s"] == 0 and ceiling["end_s"] < got["end_s"]
    res = regroup("opt-2.7b", "mix95", ("aligned",), num_requests=16, gpus=2)
    assert [r["pair"] for r in res["rows"]] == [0, 1]
    assert all({"aligned", "ceiling"} <= r.keys() for r in res["rows"])
