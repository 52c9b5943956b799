"""Decode-step microbenchmark: how KV-length spread inside one batch costs time.

Same model, same batch size, same mean KV length; only the spread of lengths within the
batch changes (aligned = every member at the mean). For each spread and each decode
attention backend it times pure decode steps. This is the CPU measurement behind
prefix-aware batching: the ratio of a mixed batch's step time to an aligned batch's.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

# name -> (fraction of short requests, long/short length ratio); mean length is preserved.
SPREADS: dict[str, tuple[float, float]] = {
    "aligned": (1.0, 1.0),
    "uniform-2x": (0.0, 2.0),  # uniform over [2m/3, 4m/3]
    "mix95-like": (0.95, 12.0),  # 5% of requests 12x longer than the rest
}


@dataclass(frozen=True)
class StepPoint:
    spread: str
    backend: str
    batch: int
    mean_kv: int
    max_kv: int
    step_ms_p50: float  # median pure-decode step time
    padding: float  # padded attention work / real work (dense only)


def kv_lengths(spread: str, batch: int, mean: int, rng: random.Random) -> list[int]:
    short_frac, ratio = SPREADS[spread]
    if spread == "uniform-2x":
        return [max(1, int(rng.uniform(2 * mean / 3, 4 * mean / 3))) for _ in range(batch)]
    n_long = batch - round(short_frac * batch)
    # solve n_short*s + n_long*ratio*s = batch*mean for the short length s
    short = max(1, round(batch * mean / ((batch - n_long) + n_long * ratio)))
    return [short] * (batch - n_long) + [short * int(ratio)] * n_long


def time_decode_steps(model_dir: str, backend: str, lengths: list[int], steps: int,
                      threads: int) -> tuple[float, float]:
    from alignedserve.engine.config import EngineConfig
    from alignedserve.engine.llm_engine import LLMEngine
    from alignedserve.scheduling.sampling_params import SamplingParams

    cfg = EngineConfig(model=model_dir, attention_backend=backend, num_threads=threads,
                       max_num_seqs=len(lengths), max_num_batched_tokens=4096)
    eng = LLMEngine(cfg, record_stats=True)
    vocab = eng.model_cfg.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for n in lengths:
        eng.add_request([rng.randrange(32, vocab) for _ in range(n)], params)
    while any(s.num_prefill_tokens for s in eng.stats[-1:]) or not eng.stats:
        eng.step()
    eng.stats.clear()
    for _ in range(steps):
        eng.step()
    decode = [s for s in eng.stats if s.num_prefill_tokens == 0 and s.num_decode == len(lengths)]
    return statistics.median(s.seconds for s in decode) * 1e3, decode[0].padding


def run(model_dir: str, batch: int = 32, mean_kv: int = 256, steps: int = 6, threads: int = 2,
        out: str | Path = "bench-results/step") -> list[StepPoint]:
    rng = random.Random(0)
    points = []
    combos = [(s, b) for s in SPREADS for b in ("dense", "varlen")]
    for spread, backend in tqdm(combos, desc="decode steps"):
        lengths = kv_lengths(spread, batch, mean_kv, rng)
        ms, pad = time_decode_steps(model_dir, backend, lengths, steps, threads)
        points.append(StepPoint(spread, backend, batch, round(statistics.mean(lengths)),
                                max(lengths), ms, pad))
    _write(points, Path(out))
    return points


def _write(points: list[StepPoint], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    best_aligned = min(p.step_ms_p50 for p in points if p.spread == "aligned")
    rows = [asdict(p) | {"vs_best_aligned": p.step_ms_p50 / best_aligned} for p in points]
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, backend in enumerate(("dense", "varlen")):
        ps = [p for p in points if p.backend == backend]
        xs = [j + 0.38 * i for j in range(len(ps))]
        ax.bar(xs, [p.step_ms_p50 for p in ps], width=0.38, label=backend)
        ax.set_xticks([j + 0.19 for j in range(len(ps))], [p.spread for p in ps])
    ax.set_ylabel("median decode step (ms)")
    ax.set_title(f"batch {points[0].batch}, mean KV {points[0].mean_kv}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)
