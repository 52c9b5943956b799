"""AlignedServe and vLLM's CPU build side by side as OpenAI servers, measured by the same
client: `vllm bench serve` (streaming `/v1/completions`, ignore_eos, greedy).

Each server in turn is started on 127.0.0.1 (`peer_servers.py`), runs every dataset and is
stopped before the next one starts, so the two never share the machine. With `rounds` > 1
that repeats, the order reversed every other round (A B, B A, ...), and the targets are
judged on each ratio's median over the rounds: the machines here drift by up to 20% within
minutes, and a fixed order charges the drift to one server. Datasets:

| name       | prompts                                   | arrivals                   |
|------------|-------------------------------------------|----------------------------|
| random-r4  | vllm bench's random: 128 in, 64 out       | Poisson 4 req/s            |
| random-inf | the same                                  | all at t=0                 |
| mix95      | loadgen/workloads.py, as `bench serve`    | all at t=0 (or `rate`)     |
| sharegpt   | the same                                  | all at t=0 (or `rate`)     |

The project's workloads are token ids; vllm bench's custom dataset takes text, so each prompt
is decoded with the model's tokenizer (and trimmed where re-encoding grows it). The server
tokenizes that text again, so prompt lengths can differ slightly from the workload's; the
rows report what the server counted (`usage.prompt_tokens`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alignedserve.loadgen.peer_servers import (
    PEER_PYTHON,
    SERVERS,
    VLLM_CLI,
    ServerProcess,
    ServerSpec,
    alignedserve_spec,
    log_tail,
    peer_env,
    vllm_spec,
)
from alignedserve.loadgen.peers_serve_report import (
    BenchRow,
    compare_all,
    machine_info,
    markdown,
    parse_result,
    plot_png,
)
from alignedserve.loadgen.workloads import WorkloadRequest, make_workload

RANDOM_RATES: dict[str, float | None] = {"random-r4": 4.0, "random-inf": None}  # None = inf
WORKLOAD_DATASETS: tuple[str, ...] = ("mix95", "sharegpt")
DATASETS: tuple[str, ...] = (*RANDOM_RATES, *WORKLOAD_DATASETS)
RANDOM_INPUT_LEN, RANDOM_OUTPUT_LEN = 128, 64
DEFAULT_NUM_PROMPTS = 64
_FIT_TRIES = 4  # decode/encode rounds when trimming a prompt back to its length
_TQDM_COUNT = re.compile(r"(\d+)/(\d+) \[")  # "32/64 [" in vllm bench's progress bar
_MEASURED = "Starting main benchmark run"  # vllm bench's line after its warm-up requests


@dataclass(frozen=True)
class PeersServeConfig:
    model: str  # model folder: served by both, and vllm bench's tokenizer
    label: str  # served model name (`model` in requests), the same on both servers
    datasets: tuple[str, ...] = DATASETS
    servers: tuple[str, ...] = SERVERS
    num_prompts: int | None = None  # requests of every dataset; None: 64 / num_requests
    num_requests: int = 64  # requests of mix95 and sharegpt (as `bench serve`'s flag)
    rate: float | None = None  # mix95/sharegpt Poisson req/s; None = all at t=0
    seed: int = 0  # workload seed and vllm bench's --seed
    len_scale: float = 4.0  # as in `bench serve`
    warmups: int = 1  # vllm bench --num-warmups: unmeasured copies of a dataset's 1st request
    dtype: str = "float32"  # both servers
    out_dir: str = "bench-results/peers-serve"
    ready_timeout_s: float = 900.0  # start-up of one server, until it answers
    rounds: int = 1  # every server over every dataset, this many times, alternating order
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        for kind, given, known in (("dataset", self.datasets, DATASETS),
                                   ("server", self.servers, SERVERS)):
            bad = [v for v in given if v not in known]
            if bad or not given:
                raise ValueError(f"unknown or no {kind}s {bad}; expected some of {list(known)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if (self.num_prompts is not None and self.num_prompts < 1) or self.num_requests < 1:
            raise ValueError("num_prompts and num_requests must be >= 1")
        if self.warmups < 0:
            raise ValueError(f"warmups must be >= 0, got {self.warmups}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0 req/s, got {self.rate}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")

    def server_order(self, round_no: int) -> tuple[str, ...]:
        """The servers of a round: as given in odd rounds, reversed in even ones."""
        return self.servers if round_no % 2 else self.servers[::-1]

    def count(self, dataset: str) -> int:
        if self.num_prompts is not None:
            return self.num_prompts
        return self.num_requests if dataset in WORKLOAD_DATASETS else DEFAULT_NUM_PROMPTS


def fit_prompt(tokenizer, ids: list[int], tries: int = _FIT_TRIES) -> tuple[str, int]:
    """Text for token ids, and its length when encoded again. Decoding random ids and
    re-encoding can merge or split tokens; a longer result is trimmed to len(ids) tokens
    and decoded again (a shorter one is kept)."""
    text = tokenizer.decode(ids)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    for _ in range(tries):
        if n <= len(ids):
            break
        text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[: len(ids)])
        n = len(tokenizer.encode(text, add_special_tokens=False))
    return text, n


def write_custom_dataset(path: Path, requests: list[WorkloadRequest], tokenizer) -> dict:
    """JSONL for vllm bench's custom dataset: one {"prompt", "output_tokens"} per request,
    in workload order (plus the workload's and the re-encoded prompt lengths, which vllm
    ignores). Returns the length summary recorded in results.json."""
    targets, fitted = [], []
    with path.open("w") as f:
        for r in requests:
            text, n = fit_prompt(tokenizer, r.prompt_token_ids)
            targets.append(len(r.prompt_token_ids))
            fitted.append(n)
            f.write(json.dumps({"prompt": text, "output_tokens": r.max_tokens,
                                "workload_prompt_tokens": len(r.prompt_token_ids),
                                "encoded_prompt_tokens": n}) + "\n")
    return {"path": str(path), "requests": len(requests),
            "workload_prompt_tokens": sum(targets), "encoded_prompt_tokens": sum(fitted),
            "output_tokens": sum(r.max_tokens for r in requests)}


def bench_command(cfg: PeersServeConfig, dataset: str, spec: ServerSpec, result: Path,
                  dataset_path: Path | None) -> list[str]:
    """The `vllm bench serve` command line of one run; `result` is the JSON it writes."""
    n = cfg.count(dataset)
    cmd = [str(PEER_PYTHON), str(VLLM_CLI), "bench", "serve", "--backend", "openai",
           "--base-url", spec.base_url, "--endpoint", "/v1/completions", "--model", cfg.label,
           "--tokenizer", cfg.model, "--ignore-eos", "--temperature", "0",
           "--seed", str(cfg.seed), "--num-prompts", str(n), "--num-warmups", str(cfg.warmups),
           "--save-result", "--save-detailed",
           "--result-dir", str(result.parent), "--result-filename", result.name,
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"]
    if dataset in RANDOM_RATES:
        rate = RANDOM_RATES[dataset]
        return [*cmd, "--dataset-name", "random", "--random-input-len", str(RANDOM_INPUT_LEN),
                "--random-output-len", str(RANDOM_OUTPUT_LEN),
                "--request-rate", "inf" if rate is None else f"{rate:g}"]
    if dataset_path is None:
        raise ValueError(f"dataset {dataset} needs its JSONL file")
    # -1: lengths from the file; no chat template, shuffle or oversampling: the workload as is
    return [*cmd, "--dataset-name", "custom", "--dataset-path", str(dataset_path),
            "--custom-output-len", "-1", "--skip-chat-template", "--disable-shuffle",
            "--no-oversample", "--request-rate", "inf" if cfg.rate is None else f"{cfg.rate:g}"]


def run_bench(cmd: list[str], log_path: Path, desc: str, total: int, progress: bool,
              on_measured: Callable[[], None] = lambda: None) -> None:
    """Run vllm bench to completion, its output to `log_path` and its progress bar's count
    into ours; `on_measured` is called when its measured run starts (after the warm-up).
    Raise with the log's tail when it fails."""
    bar = tqdm(total=total, desc=desc, unit="req", disable=not progress)
    measured = False  # past the warm-up, whose bar counts too
    with log_path.open("w") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=peer_env({}),
            text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # tqdm's \r updates arrive as separate lines (universal)
            log.write(line)
            if not measured and _MEASURED in line:
                measured = True
                on_measured()
            if measured and (m := _TQDM_COUNT.search(line)):
                bar.update(int(m.group(1)) - bar.n)
        code = proc.wait()
    bar.close()
    if code != 0:
        raise RuntimeError(f"vllm bench serve exited with {code} ({desc}); last lines of "
                           f"{log_path}:\n{log_tail(log_path)}")


def _workload_files(cfg: PeersServeConfig, out: Path) -> dict[str, dict]:
    from alignedserve.engine.config import ModelConfig
    from alignedserve.engine.tokenizer import load_tokenizer

    names = [d for d in cfg.datasets if d in WORKLOAD_DATASETS]
    if not names:
        return {}
    vocab = ModelConfig.from_pretrained(cfg.model).vocab_size
    tokenizer = load_tokenizer(cfg.model)
    files = {}
    for name in names:
        # Offline arrivals: vllm bench schedules them itself (--request-rate); the prompts
        # and lengths are the same for either mode of one seed.
        requests = make_workload(name, cfg.count(name), vocab, seed=cfg.seed,
                                 len_scale=cfg.len_scale)
        files[name] = write_custom_dataset(out / "datasets" / f"{name}.jsonl", requests,
                                           tokenizer)
    return files


def _spec(cfg: PeersServeConfig, server: str) -> ServerSpec:
    if server == "vllm":
        return vllm_spec(cfg.model, cfg.label, cfg.dtype)
    return alignedserve_spec(Path(sys.executable).parent, cfg.model, cfg.label, cfg.dtype)


def _run_server(cfg: PeersServeConfig, server: str, out: Path, files: dict[str, dict],
                runs_before: int, round_no: int = 1
                ) -> tuple[list[BenchRow], list[str], dict[str, Any]]:
    """Every dataset against one server: (rows, commands run, server record)."""
    spec = _spec(cfg, server)
    rows, commands = [], [spec.command_line()]
    total = len(cfg.datasets) * len(cfg.servers) * cfg.rounds
    tag = f"-r{round_no}" if cfg.rounds > 1 else ""
    with ServerProcess(spec, out / "logs" / f"{server}{tag}-server.log",
                       cfg.ready_timeout_s) as srv:
        for i, dataset in enumerate(cfg.datasets, runs_before + 1):
            result = out / "raw" / f"{server}-{dataset}{tag}.json"
            path = Path(files[dataset]["path"]) if dataset in files else None
            cmd = bench_command(cfg, dataset, spec, result, path)
            commands.append(shlex.join(cmd))
            load = os.getloadavg()[0]
            run_bench(cmd, out / "logs" / f"{server}-{dataset}{tag}-bench.log",
                      f"[{i}/{total}] {server} {dataset}{tag}", cfg.count(dataset),
                      cfg.progress, srv.mark_cpu)
            row = parse_result(json.loads(result.read_text()), server, dataset, load,
                               round_no)
            if (cpu := srv.cpu_since_mark()) is not None:
                row = replace(row, cpu_model=cpu.model, cpu_beside_model=cpu.beside_model,
                              cpu_processes=cpu.processes)
            rows.append(row)
            srv.snapshot()
    record = {"command": spec.command_line(), "leaked_processes": srv.leaked}
    return rows, commands, record


def run_peers_serve(cfg: PeersServeConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    for sub in ("datasets", "raw", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    files = _workload_files(cfg, out)
    rows: list[BenchRow] = []
    commands: list[str] = []
    servers: dict[str, Any] = {}
    for round_no in range(1, cfg.rounds + 1):
        for server in cfg.server_order(round_no):
            got, cmds, record = _run_server(cfg, server, out, files, len(rows), round_no)
            rows += got
            commands += cmds
            leaked = servers.get(server, {}).get("leaked_processes", [])  # every round's
            servers[server] = {**record, "leaked_processes": leaked + record["leaked_processes"]}
    comparisons = compare_all(rows)
    title = f"{cfg.label} ({cfg.dtype}): AlignedServe vs vLLM CPU, vllm bench serve"
    if cfg.rounds > 1:
        title += f", {cfg.rounds} rounds in alternating order"
    table = markdown(rows, comparisons, title)
    payload = {
        "command": cfg.command, "config": asdict(cfg), "commands": commands,
        "servers": servers, "datasets": files, "machine": machine_info(PEER_PYTHON),
        "rows": [asdict(r) for r in rows],
        "comparisons": [{**asdict(c), "all_targets_met": c.all_met} for c in comparisons],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    (out / "table.md").write_text(table)
    plot_png(out / "results.png", rows, title)
    return payload


def print_summary(payload: dict[str, Any], out_dir: str) -> None:
    print((Path(out_dir) / "table.md").read_text())
    for name, srv in payload["servers"].items():
        if srv["leaked_processes"]:
            print(f"{name}: processes left after the stop (killed): {srv['leaked_processes']}")
    print(f"wrote {out_dir}/results.json, table.md and results.png")
