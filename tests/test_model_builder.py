"""Tests for engine.model_builder / engine.tokenizer_train: HF-loadable, deterministic models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignedserve.model_zoo.model_builder import (
    MODEL_NAMES,
    build_model,
    default_models_root,
    ensure_model,
)
from alignedserve.model_zoo.tokenizer_train import SPECIAL_TOKENS, train_byte_bpe

RANDOM_MODELS = {"tiny": 4096, "tiny-qwen2": 4096, "tiny-mistral": 4096, "opt-like": 50272}
ENGLISH = (
    "The quick brown fox jumps over the lazy dog.\n"
    "It's 5 o'clock; prices rose 12.5% in 2024 -- didn't they?  Double  spaces\tand tabs.\n"
)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _no_leftovers(parent: Path) -> bool:
    """The atomic build must not leave staging or parked folders behind."""
    return not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_model_names_are_the_public_set():
    assert MODEL_NAMES == ("tiny", "tiny-qwen2", "tiny-mistral", "opt-like", "smollm2-135m")


def test_unknown_name_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no-such-model", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown model"):
        ensure_model("no-such-model", tmp_path)
    assert not (tmp_path / "x").exists()
    assert _no_leftovers(tmp_path)


@pytest.mark.parametrize("name", list(RANDOM_MODELS))
def test_random_model_loads_in_transformers(name, tmp_path):
    out = build_model(name, tmp_path / name)
    assert out == tmp_path / name
    assert _no_leftovers(tmp_path)
    for file in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / file).is_file(), file

    config = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert config["vocab_size"] == len(tok) == RANDOM_MODELS[name]
    assert config["dtype"] == "float32"
    eot, im_start, im_end = (tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)
    assert (eot, im_start, im_end) == (0, 1, 2)
    assert config["eos_token_id"] == config["bos_token_id"] == config["pad_token_id"] == eot
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [eot, im_end]

    # No automatic BOS/EOS, exact round-trip, and the raw tokenizer.json agrees with AutoTokenizer.
    ids = tok.encode(ENGLISH, add_special_tokens=False)
    assert tok(ENGLISH)["input_ids"] == ids
    assert tok.decode(ids) == ENGLISH
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(ENGLISH).ids == ids

    chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    chat_ids = tok.encode(chat, add_special_tokens=False)
    assert chat_ids[0] == im_start and chat_ids.count(im_end) == 1

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor([ids[:7]])).logits
    assert logits.shape == (1, 7, RANDOM_MODELS[name])
    assert torch.isfinite(logits).all()
    # Wide logits: a clear top-1 at (nearly) every position, so greedy decoding is robust.
    top2 = logits[0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 1e-2

    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
        assert all(weights.get_tensor(k).dtype == torch.float32 for k in sorted(keys)[:5])
    assert ("lm_head.weight" in keys) == (not config["tie_word_embeddings"])


def test_architecture_specifics(tmp_path):
    qwen = json.loads((build_model("tiny-qwen2", tmp_path / "q") / "config.json").read_text())
    assert qwen["model_type"] == "qwen2" and qwen["tie_word_embeddings"] is True
    assert qwen["use_sliding_window"] is False
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as weights:
        assert "model.layers.0.self_attn.q_proj.bias" in set(weights.keys())
    mistral = json.loads((build_model("tiny-mistral", tmp_path / "m") / "config.json").read_text())
    assert mistral["sliding_window"] == 512 and mistral["max_position_embeddings"] == 4096
    tiny = json.loads((build_model("tiny", tmp_path / "t") / "config.json").read_text())
    assert (tiny["num_attention_heads"], tiny["num_key_value_heads"]) == (8, 2)
    # Same shapes, different architectures: the weights must differ too (per-model salt).
    a = (tmp_path / "t" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "m" / "model.safetensors").read_bytes()


def test_builds_are_deterministic(tmp_path):
    torch.manual_seed(1234)
    expected_next = torch.rand(4)
    torch.manual_seed(1234)
    first = build_model("tiny", tmp_path / "a", seed=0)
    # Building must not consume or reseed the caller's global RNG.
    assert torch.equal(torch.rand(4), expected_next)
    second = build_model("tiny", tmp_path / "b", seed=0)
    other = build_model("tiny", tmp_path / "c", seed=1)

    weights = (first / "model.safetensors").read_bytes()
    assert (second / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    tokenizer = (first / "tokenizer.json").read_bytes()
    assert (second / "tokenizer.json").read_bytes() == tokenizer
    assert (other / "tokenizer.json").read_bytes() == tokenizer

    # A fresh interpreter (new hash seeds, fresh tokenizer training) gives the same bytes.
    script = "import sys; from alignedserve.model_zoo.model_builder import build_model as b; "
    script += "b('tiny', sys.argv[1], seed=0)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "d")], check=True, env=env)
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == tokenizer


def test_build_replaces_existing_folder(tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_model("tiny", out)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file()
    assert _no_leftovers(tmp_path)


def test_ensure_model_builds_only_when_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNEDSERVE_MODELS_DIR", str(tmp_path / "root"))
    assert default_models_root() == tmp_path / "root"
    monkeypatch.delenv("ALIGNEDSERVE_MODELS_DIR")
    assert default_models_root() == Path.home() / ".cache" / "alignedserve" / "models"

    built = ensure_model("tiny", tmp_path)
    assert built == tmp_path / "tiny"
    inode = (built / "model.safetensors").stat().st_ino
    assert ensure_model("tiny", str(tmp_path)) == built
    assert (built / "model.safetensors").stat().st_ino == inode

    # Any folder with a config.json counts as present, even a stub: nothing is rebuilt.
    monkeypatch.setenv("ALIGNEDSERVE_MODELS_DIR", str(tmp_path / "root"))
    stub = tmp_path / "root" / "opt-like"
    stub.mkdir(parents=True)
    (stub / "config.json").write_text("{}")
    assert ensure_model("opt-like") == stub
    assert sorted(p.name for p in stub.iterdir()) == ["config.json"]


def test_tokenizer_is_padded_when_corpus_is_too_small():
    tok = train_byte_bpe(["hello world, hello tokenizer"] * 3, 300)
    assert tok.get_vocab_size() == 300
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert "<|extra_0|>" in vocab
    text = "hello unseen words ünïcödé 123"
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(ValueError, match="vocab_size"):
        train_byte_bpe(["abc"], 100)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    return build_model("smollm2-135m", tmp_path_factory.mktemp("smollm2") / "smollm2-135m")


@pytest.mark.slow
def test_smollm2_is_converted_faithfully(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["vocab_size"] == 49152
    assert config["num_hidden_layers"] == 30
    assert config["num_key_value_heads"] == 3
    assert config["dtype"] == "float32"

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tok) == 49152
    assert tok.chat_template
    assert config["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert config["bos_token_id"] == tok.bos_token_id
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert tok.eos_token_id in generation["eos_token_id"]
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config and "is_local" not in tokenizer_config
    assert tok.decode(tok.encode(ENGLISH, add_special_tokens=False)) == ENGLISH

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32
    inputs = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
