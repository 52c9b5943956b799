"""The step profile (loadgen/profile_step.py) on a tiny model: step times, the backend and
the top operators of both phases are measured and written."""

from __future__ import annotations

import json

from alignedserve.loadgen.profile_step import run


def test_profile_reports_both_phases(tiny_dir, tmp_path):
    res = run(str(tiny_dir), "float32", threads=1, batch=6, steps=3, rows=5, out=tmp_path)
    assert res["decode_step_ms_p50"] > 0 and res["prefill_chunk_ms_p50"] > 0
    assert res["decode_backend"] in ("paged", "dense", "varlen")
    for kind in ("decode_top_ops", "prefill_top_ops"):
        ops = res[kind]
        assert 0 < len(ops) <= 5 and all(o["self_ms"] >= 0 and o["calls"] > 0 for o in ops)
        assert ops == sorted(ops, key=lambda o: -o["self_ms"])
    assert any(o["op"] in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")
               for o in res["prefill_top_ops"]), "prefill is GEMM work"
    assert json.loads((tmp_path / "profile.json").read_text()) == res
