"""The policy benchmark's report (sim/policy_report.py), on a tiny simulated run."""

from __future__ import annotations

import json

from alignedserve.sim.policy_report import KERNELS, SYSTEMS, main


def test_policy_report_writes_every_system_beside_the_ceiling(tmp_path):
    main(["--out", str(tmp_path), "--num-requests", "40", "--gpus", "1", "--models",
          "opt-2.7b", "--workloads", "mix95", "--kernel-model", "opt-2.7b",
          "--capacity-workloads", "", "--workers", "1"])
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["offline"]
    assert [r["kernel"] for r in rows] == ["vllm", *(k for k in KERNELS if k != "vllm")]
    for r in rows:
        assert set(r["decode_tps"]) == set(SYSTEMS)
        # the ceiling differs from fcfs-disagg only by the straggler term it drops
        assert r["decode_tps"]["ceiling"] >= r["decode_tps"]["fcfs-disagg"]
        assert r["swap_outs_per_request"] >= 0
    table = (tmp_path / "table.md").read_text()
    assert "| opt-2.7b | mix95 |" in table and "| split | opt-2.7b | mix95 |" in table
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_capacity_is_searched_on_several_workload_draws(monkeypatch):
    from alignedserve.sim import policy_report
    from alignedserve.sim.plan import Capacity

    seen = []

    def fake_capacity(base, system, workload, slo_ms, seed=0):
        seen.append((system, seed))
        return Capacity(system, 1.0 + seed, 0.5, 10.0 * (seed + 1), 1.0)

    monkeypatch.setattr(policy_report, "capacity", fake_capacity)
    (row, *_) = policy_report.online("opt-13b", ("mix95",), 50.0, seeds=3)
    assert seen[:3] == [("aligned", 0), ("aligned", 1), ("aligned", 2)]
    assert row["rates"] == [1.0, 2.0, 3.0] and row["rate_per_pair"] == 2.0
    assert row["tpot_p99_ms"] == 20.0
    assert "| 2.00 | 1.00, 2.00, 3.00 | 20.0 |" in policy_report.markdown([], [row])
