"""`bench peers-serve`'s report: result JSON to rows, the targets per round and over rounds,
the table, the plot and the machine record (loadgen/peers_serve_report.py)."""

from __future__ import annotations

import dataclasses

import pytest
from peers_serve_rows import _in_round, _result, _row

from alignedserve.loadgen.peers_serve_report import (
    compare,
    compare_all,
    machine_info,
    markdown,
    parse_result,
    plot_png,
)


def test_result_json_becomes_a_row():
    row = parse_result(_result(), "alignedserve", "random-inf", load_avg_1m=0.5)
    assert (row.server, row.dataset, row.completed, row.failed) == ("alignedserve",
                                                                    "random-inf", 3, 1)
    assert (row.output_tps, row.total_tps, row.request_tps) == (29.86, 90.51, 0.4666)
    assert (row.ttft_p50_ms, row.ttft_p99_ms) == (1490.9, 1491.3)
    assert (row.tpot_p50_ms, row.tpot_p99_ms, row.itl_p50_ms, row.itl_p99_ms) == (
        78.4, 97.2, 58.0, 199.9)
    assert row.input_tokens_mean == 130.0 and row.output_tokens == 192
    assert row.duration_s == 6.43 and row.load_avg_1m == 0.5
    assert row.errors == ("aiohttp.ClientPayloadError: Response payload is not completed",)
    with pytest.raises(KeyError, match="p50_tpot_ms"):
        parse_result({k: v for k, v in _result().items() if k != "p50_tpot_ms"}, "vllm", "x")


def test_targets_pass_and_fail():
    met = compare(_row("alignedserve", "mix95", 120.0, 1400.0, 90.0),
                  _row("vllm", "mix95", 100.0, 1000.0, 100.0))
    assert met.output_tps_ratio == pytest.approx(1.2)
    assert met.ttft_p50_ratio == pytest.approx(1.4) and met.tpot_p99_ratio == pytest.approx(0.9)
    assert [t.passed for t in met.targets] == [True, True, True, True] and met.all_met
    missed = compare(_row("alignedserve", "mix95", 90.0, 2000.0, 100.0, failed=2),
                     _row("vllm", "mix95", 100.0, 1000.0, 100.0))
    assert [t.passed for t in missed.targets] == [False, False, True, False]
    assert missed.targets[3].value == 2.0 and missed.all_met is False
    zero = compare(_row("alignedserve", "x", 1.0, 1.0, 1.0), _row("vllm", "x", 0.0, 1.0, 1.0))
    assert zero.output_tps_ratio is None and zero.targets[0].passed is None
    assert zero.all_met is None


def test_comparisons_table_and_plot(tmp_path):
    rows = [_row("alignedserve", "mix95", 120.0, 1400.0, 90.0),
            _row("alignedserve", "sharegpt", 50.0, 3000.0, 90.0),
            _row("vllm", "mix95", 100.0, 1000.0, 100.0),
            _row("vllm", "random-r4", 80.0, 100.0, 50.0)]
    comps = compare_all(rows)
    assert [c.dataset for c in comps] == ["mix95"]  # the only dataset both servers ran
    md = markdown(rows, compare_all([*rows, _row("vllm", "sharegpt", 100.0, 1000.0, 80.0)]),
                  "t")
    assert "| mix95 | alignedserve | 120.0 |" in md and "| random-r4 | vllm | 80.0 |" in md
    assert "| mix95 | 1.2 pass | 1.4 pass | 0.9 pass | 0 pass | pass |" in md
    assert "| sharegpt | 0.5 FAIL | 3 FAIL | 1.12 FAIL | 0 pass | FAIL |" in md
    plot_png(tmp_path / "r.png", rows, "t")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_table_shows_cpu_beside_the_model():
    row = dataclasses.replace(_row("alignedserve", "mix95", 120.0, 1400.0, 90.0),
                              cpu_model=1.71, cpu_beside_model=0.19,
                              cpu_processes=(("ray::Replica", 1.71), ("ray::Router", 0.06)))
    md = markdown([row, _row("vllm", "mix95", 100.0, 1000.0, 100.0)], [], "t")
    assert "| 3/0 | 1.71 / 0.190 |" in md and "| 3/0 | - |" in md
    assert "- alignedserve mix95: ray::Router 0.060" in md


def test_machine_info_without_peer_venv(tmp_path):
    info = machine_info(tmp_path / "no-python")
    assert "avx512_bf16" in info["cpu_flags"] and "amx_bf16" in info["cpu_flags"]
    assert info["cpu_model"] and len(info["load_avg"]) == 3
    assert info["versions"]["alignedserve"] and info["peer_versions"].startswith("unavailable")


def test_rounds_are_compared_one_by_one_and_judged_on_the_median():
    rows = [_in_round(_row("alignedserve", "mix95", 90.0, 1000.0, 100.0), 1),
            _in_round(_row("vllm", "mix95", 100.0, 1000.0, 100.0), 1),
            _in_round(_row("vllm", "mix95", 100.0, 1000.0, 100.0), 2),
            _in_round(_row("alignedserve", "mix95", 120.0, 1000.0, 90.0, failed=1), 2),
            _in_round(_row("vllm", "mix95", 100.0, 1000.0, 100.0), 3),
            _in_round(_row("alignedserve", "mix95", 105.0, 1600.0, 95.0), 3)]
    comps = compare_all(rows)
    assert [(c.round, c.label) for c in comps] == [
        (1, "mix95, round 1"), (2, "mix95, round 2"), (3, "mix95, round 3"),
        (None, "mix95, median of 3 rounds")]
    assert [c.output_tps_ratio for c in comps[:3]] == pytest.approx([0.9, 1.2, 1.05])
    median = comps[3]
    assert median.output_tps_ratio == pytest.approx(1.05)
    assert median.ttft_p50_ratio == pytest.approx(1.0)
    assert median.tpot_p99_ratio == pytest.approx(0.95)
    assert median.targets[3].value == 1.0 and median.all_met is False  # every round's failure
    md = markdown(rows, comps, "t")
    assert "| mix95, round 2 | alignedserve | 120.0 |" in md
    assert "| mix95, median of 3 rounds | 1.05 pass | 1 pass | 0.95 pass | 1 FAIL | FAIL |" in md
    one = compare_all([_row("alignedserve", "x", 1.0, 1.0, 1.0), _row("vllm", "x", 1.0, 1.0, 1.0)])
    assert [c.label for c in one] == ["x"]  # a single round: no round in the names
