"""The fused bf16 elementwise ops of the Llama forward (`engine/csrc/fused_ops.cpp`) against
the torch ops they replace (`TorchOps`, transformers' order), and the bf16 engine with and
without them."""

from __future__ import annotations

import pytest
import torch

from alignedserve.engine.config import ModelConfig
from alignedserve.engine.models.llama import FusedBf16Ops, TorchOps, elementwise_ops
from alignedserve.engine.native import kernels

pytestmark = pytest.mark.skipif(kernels() is None, reason="the C++ kernels do not build here")

BF16 = dict(atol=2e-2, rtol=2e-2)  # about one bf16 rounding of values near 1


def _rows(t: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, n, generator=g) * 2).to(torch.bfloat16)


@pytest.fixture
def fused() -> FusedBf16Ops:
    return FusedBf16Ops(kernels())


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_norm_and_add_norm_match_torch(fused, rows):
    h, d = _rows(rows, 576, 1), _rows(rows, 576, 2)
    w = _rows(1, 576, 3)[0]
    torch.testing.assert_close(fused.norm(h, w, 1e-5).float(),
                               TorchOps().norm(h, w, 1e-5).float(), **BF16)
    want_h, want_x = TorchOps().add_norm(h, d, w, 1e-5)
    h2 = h.clone()
    got_h, got_x = fused.add_norm(h2, d, w, 1e-5)
    assert got_h is h2  # updated in place
    assert torch.equal(got_h, want_h)  # the residual sum rounds exactly as torch's bf16 add
    torch.testing.assert_close(got_x.float(), want_x.float(), **BF16)


def test_norm_takes_a_strided_row_view(fused):
    wide = _rows(5, 1000, 4)
    w = _rows(1, 576, 5)[0]
    torch.testing.assert_close(fused.norm(wide[:, :576], w, 1e-6).float(),
                               TorchOps().norm(wide[:, :576], w, 1e-6).float(), **BF16)


@pytest.mark.parametrize("width", [1536, 40])  # whole vectors, and a tail
def test_silu_mul_matches_torch(fused, width):
    gu = _rows(9, 2 * width, 6)
    torch.testing.assert_close(fused.silu_mul(gu).float(), TorchOps().silu_mul(gu).float(),
                               **BF16)


def test_rope_matches_torch_and_leaves_v_alone(fused):
    cfg = ModelConfig(model_type="llama", arch="llama", vocab_size=10, hidden_size=576,
                      num_layers=1, num_heads=9, num_kv_heads=3, head_dim=64,
                      intermediate_size=8, max_position_embeddings=64, norm_eps=1e-5,
                      tie_word_embeddings=True)
    g = torch.Generator().manual_seed(7)
    cos, sin = torch.rand(64, 64, generator=g), torch.rand(64, 64, generator=g)
    positions = torch.tensor([0, 5, 63, 17])
    qkv = _rows(4, (9 + 6) * 64, 8)
    want = TorchOps().qkv_rope(qkv.clone(), TorchOps().rope_tables(cos, sin, positions,
                                                                   torch.bfloat16), cfg)
    got = fused.qkv_rope(qkv.clone(), fused.rope_tables(cos, sin, positions, torch.bfloat16),
                         cfg)
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a.float(), b.float(), **BF16)
    assert torch.equal(got[2], want[2])


def test_bad_inputs_are_refused(fused):
    with pytest.raises(RuntimeError, match="bfloat16"):
        fused.norm(torch.ones(2, 8), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        fused.norm(_rows(2, 8, 0), _rows(1, 7, 0)[0], 1e-5)
    with pytest.raises(RuntimeError, match="even"):
        fused.silu_mul(_rows(2, 7, 0))


def test_only_a_bf16_cpu_model_gets_the_fused_ops(monkeypatch):
    cpu = torch.device("cpu")
    assert isinstance(elementwise_ops(torch.bfloat16, cpu), FusedBf16Ops)
    assert type(elementwise_ops(torch.float32, cpu)) is TorchOps
    monkeypatch.setenv("ALIGNEDSERVE_NO_FUSED", "1")
    assert type(elementwise_ops(torch.bfloat16, cpu)) is TorchOps


def test_bf16_engine_with_and_without_the_fused_ops(tiny_dir, pools, monkeypatch):
    from alignedserve.llm import LLM
    from alignedserve.scheduling.sampling_params import SamplingParams

    prompts = [[5 + i for i in range(n)] for n in (3, 40, 130)]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=True)
    fused_llm = LLM(str(tiny_dir), dtype="bfloat16", **pools)
    assert isinstance(fused_llm.engine.runner.model.ops, FusedBf16Ops)
    fused_out = fused_llm.generate(prompts, greedy, use_tqdm=False)
    monkeypatch.setenv("ALIGNEDSERVE_NO_FUSED", "1")
    torch_llm = LLM(str(tiny_dir), dtype="bfloat16", **pools)
    assert type(torch_llm.engine.runner.model.ops) is TorchOps
    torch_out = torch_llm.generate(prompts, greedy, use_tqdm=False)
    for a, b in zip(fused_out, torch_out, strict=True):
        assert len(a.token_ids) == 4
        # bf16 rounding differs in places; the first token's logprob barely moves.
        assert abs(a.logprobs[0] - b.logprobs[0]) < 0.1 or a.token_ids[0] != b.token_ids[0]
    same = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(fused_out, torch_out,
                                                                strict=True))
    assert same >= 2
