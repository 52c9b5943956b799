"""Profile of one decode step and one prefill chunk of the in-process engine.

The decode step is a batch of `--batch` requests with mixed KV lengths (most 100-300
tokens, three of 1,500-2,000: the straggler shape); the prefill chunk is a full
`max_num_batched_tokens` chunk of four prompts. Each is timed over several runs (median),
then profiled with torch's profiler; the top operators by self time are printed and written
to `<out>/profile.json`. Only the engine's public API is used, so the same module runs
against an older checkout (the "before" of BENCHMARKS.md).
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _engine(model_dir: str, dtype: str, threads: int, batch: int):
    from alignedserve.engine.config import EngineConfig
    from alignedserve.engine.llm_engine import LLMEngine

    cfg = EngineConfig(model=model_dir, dtype=dtype, num_threads=threads, max_num_seqs=batch,
                       max_num_batched_tokens=1024)
    return LLMEngine(cfg, record_stats=True)


def _top_ops(prof: Any, rows: int) -> list[dict[str, Any]]:
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    return [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3)} for e in ops[:rows]]


def run(model_dir: str, dtype: str = "float32", threads: int = 2, batch: int = 64,
        steps: int = 8, rows: int = 10, out: str | Path | None = None) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from alignedserve.scheduling.sampling_params import SamplingParams

    rng = random.Random(0)
    eng = _engine(model_dir, dtype, threads, batch)
    vocab = eng.model_cfg.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps * 3, ignore_eos=True)
    lens = [rng.randint(100, 300) for _ in range(batch - 3)] + [1500, 1800, 2000]
    for n in lens:
        eng.add_request([rng.randrange(32, vocab) for _ in range(n)], params)
    prefill: list[float] = []
    with tqdm(desc="prefill", unit="step") as bar:
        while not eng.stats or eng.stats[-1].num_prefill_tokens:
            eng.step()
            s = eng.stats[-1]
            if s.num_prefill_tokens == 1024 and s.num_decode == 0:
                prefill.append(s.seconds)
            bar.update()
    eng.stats.clear()
    for _ in tqdm(range(steps), desc="decode", unit="step"):
        eng.step()
    decode = [s.seconds for s in eng.stats if s.num_prefill_tokens == 0]
    backend = eng.stats[-1].backend or "-"
    with profile(activities=[ProfilerActivity.CPU]) as dprof:
        eng.step()
    # A fresh engine for the prefill profile: four prompts fill one 1,024-token chunk.
    eng = _engine(model_dir, dtype, threads, batch)
    for n in (200, 300, 250, 274):
        eng.add_request([rng.randrange(32, vocab) for _ in range(n)], params)
    with profile(activities=[ProfilerActivity.CPU]) as pprof:
        eng.step()
    result = {
        "model": Path(model_dir).name, "dtype": dtype, "threads": threads, "batch": batch,
        "torch": torch.__version__,
        "decode_step_ms_p50": round(statistics.median(decode) * 1e3, 1),
        "decode_backend": backend,
        "prefill_chunk_ms_p50": round(statistics.median(prefill) * 1e3, 1) if prefill else None,
        "prefill_chunks_timed": len(prefill),
        "decode_top_ops": _top_ops(dprof, rows),
        "prefill_top_ops": _top_ops(pprof, rows),
        "note": "self CPU time of aten ops only: time inside the C++ kernels of engine/csrc "
                "is not an aten op and shows up only in the step time",
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "profile.json").write_text(json.dumps(result, indent=2))
    return result


def print_profile(res: dict[str, Any]) -> None:
    print(f"{res['model']} {res['dtype']} {res['threads']} threads: decode step (batch "
          f"{res['batch']}, mixed KV) p50 {res['decode_step_ms_p50']} ms; 1,024-token "
          f"prefill chunk p50 {res['prefill_chunk_ms_p50']} ms")
    for kind in ("decode", "prefill"):
        print(f"\n{kind}: top ops by self CPU time (one step)")
        for r in res[f"{kind}_top_ops"]:
            print(f"  {r['op']:<45} {r['calls']:>6} calls {r['self_ms']:>9.1f} ms "
                  f"{r['share']:>6.1%}")


if __name__ == "__main__":
    import argparse

    from alignedserve.model_zoo.model_builder import ensure_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    print_profile(run(str(ensure_model(a.model)), a.dtype, a.threads, a.batch, out=a.out))
