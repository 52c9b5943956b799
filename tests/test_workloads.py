"""Workload generator: seeded, within the documented ranges, right proportions and arrivals."""

from __future__ import annotations

import numpy as np
import pytest

from alignedserve.loadgen.workloads import (
    DEFAULT_MIN_TOKEN_ID,
    WORKLOAD_NAMES,
    make_workload,
)

VOCAB = 49152

# (prompt range, output range) of WORKLOADS.md at len_scale=4, inclusive.
TABLE_RANGES = {
    "mix95": ((16, 2047), (16, 128)),
    "mix70": ((16, 2047), (16, 128)),
    "sharegpt": ((4, 2048), (4, 512)),
    "longbench": ((1024, 4095), (16, 128)),
    "azure-conv": ((8, 2048), (4, 256)),
}


def lengths(reqs) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([len(r.prompt_token_ids) for r in reqs]),
            np.array([r.max_tokens for r in reqs]))


def test_names_cover_the_table():
    assert set(WORKLOAD_NAMES) == set(TABLE_RANGES)


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_deterministic_for_a_seed(name):
    a = make_workload(name, 50, VOCAB, seed=3)
    b = make_workload(name, 50, VOCAB, seed=3)
    c = make_workload(name, 50, VOCAB, seed=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_lengths_within_table_ranges(name):
    reqs = make_workload(name, 500, VOCAB, seed=1)
    prompts, outputs = lengths(reqs)
    (plo, phi), (olo, ohi) = TABLE_RANGES[name]
    assert plo <= prompts.min() and prompts.max() <= phi
    assert olo <= outputs.min() and outputs.max() <= ohi
    assert all(r.arrival_s == 0.0 for r in reqs)


def test_len_scale_1_is_four_times_longer():
    prompts, outputs = lengths(make_workload("longbench", 500, VOCAB, seed=2, len_scale=1))
    assert prompts.min() >= 4 * 1024 and prompts.max() <= 4 * 4095
    assert outputs.min() >= 4 * 16 and outputs.max() <= 4 * 128
    p4, _ = lengths(make_workload("longbench", 500, VOCAB, seed=2, len_scale=4))
    assert 3.5 < prompts.mean() / p4.mean() < 4.5


# Tolerances are about 5 binomial standard deviations at 2000 requests.
@pytest.mark.parametrize(("name", "long_frac", "tol"), [("mix95", 0.05, 0.025),
                                                        ("mix70", 0.30, 0.05)])
def test_mix_long_fraction(name, long_frac, tol):
    prompts, _ = lengths(make_workload(name, 2000, VOCAB, seed=0))
    assert abs(float((prompts >= 256).mean()) - long_frac) < tol


def test_lognormal_medians():
    prompts, outputs = lengths(make_workload("sharegpt", 2000, VOCAB, seed=0))
    assert 100 < np.median(prompts) < 140
    assert 85 < np.median(outputs) < 115
    prompts, outputs = lengths(make_workload("azure-conv", 2000, VOCAB, seed=0))
    assert 225 < np.median(prompts) < 285
    assert 56 < np.median(outputs) < 72


def test_token_ids_in_range():
    reqs = make_workload("mix95", 200, 1000, seed=0)
    ids = np.concatenate([r.prompt_token_ids for r in reqs])
    assert ids.min() >= DEFAULT_MIN_TOKEN_ID and ids.max() < 1000
    small = make_workload("mix95", 20, 512, seed=0, min_token_id=300)
    assert min(min(r.prompt_token_ids) for r in small) >= 300


def test_max_model_len_clips_prompt_plus_output():
    reqs = make_workload("longbench", 200, VOCAB, seed=0, max_model_len=1500)
    assert all(len(r.prompt_token_ids) + r.max_tokens <= 1500 for r in reqs)
    assert all(len(r.prompt_token_ids) >= 1 for r in reqs)


@pytest.mark.parametrize("burstiness", [1.0, 0.5])
def test_online_arrivals(burstiness):
    rate = 4.0
    reqs = make_workload("mix95", 2000, VOCAB, seed=0, mode="online", rate=rate,
                         burstiness=burstiness)
    t = np.array([r.arrival_s for r in reqs])
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert (gaps > 0).all()
    assert abs(gaps.mean() - 1 / rate) < 0.1 / rate
    # Gamma(k) gaps have coefficient of variation 1/sqrt(k): burstier when k < 1.
    assert abs(gaps.std() / gaps.mean() - burstiness**-0.5) < 0.15


def test_online_keeps_offline_prompts():
    off = make_workload("sharegpt", 30, VOCAB, seed=5)
    on = make_workload("sharegpt", 30, VOCAB, seed=5, mode="online", rate=2.0)
    assert [r.prompt_token_ids for r in off] == [r.prompt_token_ids for r in on]


def test_errors():
    with pytest.raises(ValueError, match="mix95"):
        make_workload("nope", 10, VOCAB)
    with pytest.raises(ValueError, match="rate"):
        make_workload("mix95", 10, VOCAB, mode="online")
    with pytest.raises(ValueError):
        make_workload("mix95", 0, VOCAB)
    with pytest.raises(ValueError):
        make_workload("mix95", 10, VOCAB, len_scale=0)


def test_static_batches_split_where_padding_would_overflow_positions():
    from alignedserve.loadgen.hf_peers import static_batches
    from alignedserve.loadgen.workloads import WorkloadRequest

    reqs = [WorkloadRequest([1] * n, m, 0.0) for n, m in [(10, 5), (1900, 20), (50, 150), (8, 8)]]
    batches = static_batches(reqs, batch_size=3, max_len=2048)
    assert [[len(r.prompt_token_ids) for r in b] for b in batches] == [[10, 1900], [50, 8]]
    assert all(max(len(r.prompt_token_ids) for r in b) + max(r.max_tokens for r in b) <= 2048
               for b in batches)
    assert [len(b) for b in static_batches(reqs[:1] * 7, 3, 2048)] == [3, 3, 1]
