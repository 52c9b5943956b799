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
