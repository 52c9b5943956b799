"""`bench peers-serve` without vLLM: the custom-dataset file, the vllm bench command lines,
result JSON -> rows, ratios and targets, the report files, the server process lifecycle
(with a fake OpenAI server) and the CLI wiring."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from peers_serve_rows import _in_round, _row

from alignedserve.cluster.cli import main
from alignedserve.loadgen import bench_peers_serve as bps
from alignedserve.loadgen.peer_servers import (
    ServerProcess,
    ServerSpec,
    alignedserve_spec,
    cpu_shares,
    process_label,
    vllm_spec,
)
from alignedserve.loadgen.workloads import make_workload
from alignedserve.ports import free_port


def test_custom_dataset_keeps_output_lengths_and_prompt_lengths(tiny_dir, tmp_path):
    from alignedserve.engine.config import ModelConfig
    from alignedserve.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    reqs = make_workload("mix95", 12, ModelConfig.from_pretrained(tiny_dir).vocab_size,
                         seed=0, len_scale=8.0)
    path = tmp_path / "mix95.jsonl"
    summary = bps.write_custom_dataset(path, reqs, tok)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(reqs) == summary["requests"]
    for line, req in zip(lines, reqs, strict=True):
        assert isinstance(line["prompt"], str) and line["prompt"]
        assert line["output_tokens"] == req.max_tokens  # what --custom-output-len -1 reads
        encoded = len(tok.encode(line["prompt"], add_special_tokens=False))
        assert line["encoded_prompt_tokens"] == encoded
        assert line["workload_prompt_tokens"] == len(req.prompt_token_ids)
        # Trimmed where re-encoding grew it; never longer, and not much shorter.
        assert 0.8 * len(req.prompt_token_ids) <= encoded <= len(req.prompt_token_ids)
    assert summary["output_tokens"] == sum(r.max_tokens for r in reqs)
    assert summary["workload_prompt_tokens"] == sum(len(r.prompt_token_ids) for r in reqs)


def test_fit_prompt_trims_text_that_re_encodes_longer():
    class OneCharPerId:
        """encode: one id per letter; decode: letters, except that id 0 becomes "xy"."""

        def decode(self, ids):
            return "".join("xy" if i == 0 else chr(ord("a") + i) for i in ids)

        def encode(self, text, add_special_tokens=False):
            return [ord(c) - ord("a") for c in text]

    text, n = bps.fit_prompt(OneCharPerId(), [0, 1, 2])
    assert (text, n) == ("xyb", 3)  # "xybc" re-encodes to 4 ids: trimmed to 3


def test_bench_commands_of_each_dataset(tmp_path):
    cfg = bps.PeersServeConfig(model="/m/smol", label="smol", num_prompts=8)
    spec = ServerSpec("vllm", ("x",), (), 8123, "smol")
    r4 = bps.bench_command(cfg, "random-r4", spec, tmp_path / "r.json", None)
    joined = " ".join(r4)
    for part in ("bench serve --backend openai --base-url http://127.0.0.1:8123",
                 "--endpoint /v1/completions --model smol --tokenizer /m/smol --ignore-eos",
                 "--num-prompts 8", "--dataset-name random --random-input-len 128 "
                 "--random-output-len 64 --request-rate 4",
                 "--percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99",
                 f"--result-dir {tmp_path} --result-filename r.json", "--seed 0",
                 "--num-warmups 1"):
        assert part in joined
    inf = bps.bench_command(cfg, "random-inf", spec, tmp_path / "r.json", None)
    assert inf[inf.index("--request-rate") + 1] == "inf"
    mix = bps.bench_command(cfg, "mix95", spec, tmp_path / "m.json", tmp_path / "mix95.jsonl")
    joined = " ".join(mix)
    assert f"--dataset-name custom --dataset-path {tmp_path / 'mix95.jsonl'}" in joined
    assert "--custom-output-len -1 --skip-chat-template --disable-shuffle --no-oversample" \
        in joined and mix[mix.index("--request-rate") + 1] == "inf"
    online = bps.PeersServeConfig(model="/m", label="m", rate=2.5, num_requests=10)
    cmd = bps.bench_command(online, "sharegpt", spec, tmp_path / "s.json", tmp_path / "s.jsonl")
    assert cmd[cmd.index("--request-rate") + 1] == "2.5"
    assert cmd[cmd.index("--num-prompts") + 1] == "10"
    with pytest.raises(ValueError, match="JSONL"):
        bps.bench_command(cfg, "mix95", spec, tmp_path / "m.json", None)


def test_both_servers_get_the_same_kv_pool(monkeypatch):
    """vLLM's KV space and AlignedServe's device pool are one figure, and our server's
    config really reads it (and the dtype) from the environment the spec sets."""
    from alignedserve.config import load_config

    ours = alignedserve_spec(Path("/venv/bin"), "/m", "m", "float32")
    theirs = dict(vllm_spec("/m", "m", "float32").env)
    for k, v in ours.env:
        monkeypatch.setenv(k, v)
    cfg = load_config()
    assert cfg.engine.kv_cache_gib == float(theirs["VLLM_CPU_KVCACHE_SPACE"]) == 2
    assert cfg.engine.dtype == "float32" and cfg.compute_nice == 0


def test_config_counts_and_validation():
    cfg = bps.PeersServeConfig(model="m", label="m", num_requests=20)
    assert (cfg.count("random-r4"), cfg.count("mix95")) == (64, 20)
    assert bps.PeersServeConfig(model="m", label="m", num_prompts=8).count("sharegpt") == 8
    with pytest.raises(ValueError, match="unknown or no datasets"):
        bps.PeersServeConfig(model="m", label="m", datasets=("mix70",))
    with pytest.raises(ValueError, match="unknown or no servers"):
        bps.PeersServeConfig(model="m", label="m", servers=("sglang",))
    with pytest.raises(ValueError, match="rate"):
        bps.PeersServeConfig(model="m", label="m", rate=0.0)


def test_cpu_shares_by_label_busiest_first():
    assert process_label(["ray::ServeReplica:alignedserve:Router", ""]) == \
        "ray::ServeReplica:alignedserve:Router"
    assert process_label(["VLLM::EngineCore"]) == "VLLM::EngineCore"
    assert process_label(["/v/bin/python", "-u", "/r/ray/_private/log_monitor.py",
                          "--x=1"]) == "log_monitor.py"
    assert process_label(["/r/ray/core/src/ray/raylet/raylet", "--a"]) == "raylet"
    assert process_label(["redis-server 127.0.0.1:6379", "", ""]) == "redis-server"
    assert process_label([]) == "?"
    before = {1: ("model", 10.0), 2: ("ray::IDLE", 1.0), 3: ("ray::IDLE", 2.0),
              4: ("gone", 5.0)}
    after = {1: ("model", 28.0), 2: ("ray::IDLE", 1.5), 3: ("ray::IDLE", 2.5),
             5: ("new", 1.0)}  # 4 ended meanwhile, 5 started: from zero
    cpu = cpu_shares(before, after, 10.0)
    assert cpu.processes == (("model", 1.8), ("ray::IDLE", 0.1), ("new", 0.1))
    assert cpu.model == 1.8 and cpu.beside_model == pytest.approx(0.2)
    with pytest.raises(ValueError):
        cpu_shares(before, after, 0.0)


def test_run_bench_relays_progress_and_reports_failures(tmp_path):
    ok = ("print(' 1/1 [00:01]'); print('Starting main benchmark run...'); "
          "[print(f' {i}/3 [00:0{i}]', end='\\r', flush=True) for i in range(4)]")
    marks = []
    bps.run_bench([sys.executable, "-c", ok], tmp_path / "ok.log", "x", 3, progress=False,
                  on_measured=lambda: marks.append(1))
    assert "3/3 [" in (tmp_path / "ok.log").read_text()
    assert marks == [1]  # once, when the measured run starts (not at the warm-up's bar)
    bad = "print('ValueError: All requests failed'); raise SystemExit(4)"
    with pytest.raises(RuntimeError, match=r"exited with 4 \(y\)[\s\S]*All requests failed"):
        bps.run_bench([sys.executable, "-c", bad], tmp_path / "bad.log", "y", 3, False)


FAKE_SERVER = textwrap.dedent("""
    import json, signal, subprocess, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"data": [{"id": "m"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"choices": [{"text": "hi"}]})

    # A child in a session of its own that the server does not stop: a leak to reap.
    if sys.argv[2] == "leak":
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
    if sys.argv[2] == "spin":  # a child that spins for a few seconds (spinner.py)
        subprocess.Popen([sys.executable, sys.argv[3]])
    srv = HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    srv.serve_forever()
""")


def _fake(tmp_path: Path, mode: str) -> ServerSpec:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = free_port()
    return ServerSpec("fake", (sys.executable, str(script), str(port), mode), (), port, "m")


def test_server_process_starts_serves_and_reaps_leaks(tmp_path):
    with ServerProcess(_fake(tmp_path, "leak"), tmp_path / "srv.log", 30.0, grace_s=5) as srv:
        import httpx

        assert httpx.get(f"{srv.spec.base_url}/v1/models").json()["data"][0]["id"] == "m"
        leaked_pids = [p.pid for p in psutil.Process(srv._proc.pid).children(recursive=True)]
    assert len(srv.leaked) == 1 and srv.leaked[0].startswith(f"{leaked_pids[0]} ")
    assert not psutil.pid_exists(leaked_pids[0]) or \
        psutil.Process(leaked_pids[0]).status() == psutil.STATUS_ZOMBIE
    with ServerProcess(_fake(tmp_path, "clean"), tmp_path / "srv2.log", 30.0, grace_s=5) as srv:
        pass
    assert srv.leaked == []


def test_server_process_measures_its_processes_cpu(tmp_path):
    spinner = tmp_path / "spinner.py"
    spinner.write_text("import time\nend = time.time() + 3\nwhile time.time() < end: pass\n")
    spec = _fake(tmp_path, "spin")
    spec = dataclasses.replace(spec, argv=(*spec.argv, str(spinner)))
    with ServerProcess(spec, tmp_path / "srv.log", 30.0, grace_s=5) as srv:
        assert srv.cpu_since_mark() is None  # no window open
        srv.mark_cpu()
        time.sleep(1.0)
        cpu = srv.cpu_since_mark()
    assert cpu is not None and cpu.processes[0][0] == "spinner.py"  # the busiest: the model
    assert cpu.model > 0 and {name for name, _ in cpu.processes} == {"spinner.py",
                                                                     "fake_server.py"}


def test_server_that_dies_reports_its_log(tmp_path):
    spec = ServerSpec("fake", (sys.executable, "-c", "print('no model here'); exit(3)"), (),
                      free_port(), "m")
    with pytest.raises(RuntimeError, match=r"exited with 3 before it served[\s\S]*no model"):
        ServerProcess(spec, tmp_path / "dead.log", 30.0).__enter__()


def test_cli_wires_flags_into_the_config(monkeypatch, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    seen = {}
    monkeypatch.setattr(bps, "run_peers_serve", lambda cfg: seen.setdefault("cfg", cfg))
    monkeypatch.setattr(bps, "print_summary", lambda payload, out: seen.setdefault("out", out))
    argv = ["bench", "peers-serve", "--model", str(model), "--datasets", "random-r4,mix95",
            "--num-prompts", "8", "--servers", "vllm", "--dtype", "bfloat16", "--rate", "2",
            "--warmups", "0", "--rounds", "2",
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.model, cfg.label) == (str(model), "my-model")
    assert cfg.datasets == ("random-r4", "mix95") and cfg.servers == ("vllm",)
    assert (cfg.num_prompts, cfg.num_requests, cfg.rate, cfg.dtype) == (8, 64, 2.0, "bfloat16")
    assert cfg.warmups == 0 and cfg.rounds == 2
    assert cfg.out_dir == seen["out"] == str(tmp_path / "o") and not cfg.progress
    assert cfg.command.startswith("alignedserve bench peers-serve --model")
    from alignedserve.cluster.cli import build_parser

    args = build_parser().parse_args(["bench", "peers-serve", "--model", "m"])
    assert args.datasets == bps.DATASETS == ("random-r4", "random-inf", "mix95", "sharegpt")
    assert args.servers == ("alignedserve", "vllm") and args.dtype == "float32"
    assert args.out == "bench-results/peers-serve" and args.num_prompts is None
    assert args.warmups == 1 and args.rate is None and args.rounds == 1
    assert main(["bench", "peers-serve", "--model", str(model), "--datasets", "nope"]) == 2


def test_rounds_run_the_servers_in_alternating_order(monkeypatch, tmp_path):
    runs = []

    def fake_run_server(cfg, server, out, files, runs_before, round_no):
        runs.append((round_no, server))
        got = [_in_round(_row(server, d, 100.0 + round_no, 1000.0, 100.0), round_no)
               for d in cfg.datasets]
        return got, [f"{server} {round_no}"], {"command": server,
                                                "leaked_processes": [f"{server}-{round_no}"]}

    monkeypatch.setattr(bps, "_run_server", fake_run_server)
    cfg = bps.PeersServeConfig(model=str(tmp_path), label="m", datasets=("random-r4",),
                               rounds=3, out_dir=str(tmp_path / "o"), progress=False)
    payload = bps.run_peers_serve(cfg)
    assert runs == [(1, "alignedserve"), (1, "vllm"), (2, "vllm"), (2, "alignedserve"),
                    (3, "alignedserve"), (3, "vllm")]
    assert [c["round"] for c in payload["comparisons"]] == [1, 2, 3, None]
    assert payload["servers"]["vllm"]["leaked_processes"] == ["vllm-1", "vllm-2", "vllm-3"]
    assert "3 rounds in alternating order" in (tmp_path / "o" / "table.md").read_text()
    with pytest.raises(ValueError, match="rounds"):
        bps.PeersServeConfig(model="m", label="m", rounds=0)
