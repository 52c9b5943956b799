"""Typed configuration of the engine: the normalized model shape and the engine knobs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignedserve.engine.cpuinfo import cpu_flags
from alignedserve.scheduling.aligned_config import AlignedKnobs

Arch = Literal["llama", "opt"]

# HF `model_type` -> our forward implementation. Qwen2 and Mistral are Llama-shaped.
SUPPORTED_MODEL_TYPES: dict[str, Arch] = {
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
    "opt": "opt",
}


class ModelConfig(BaseModel):
    """The shape of a decoder-only model, normalized across HF families."""

    model_config = ConfigDict(frozen=True)

    model_type: str  # HF model_type, e.g. "llama"
    arch: Arch  # which forward implementation runs it
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2 and OPT carry biases on q/k/v
    sliding_window: int | None = None  # Mistral: keys at positions > pos - window only
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        from transformers import AutoConfig, GenerationConfig

        hf = AutoConfig.from_pretrained(str(model_dir))
        arch = SUPPORTED_MODEL_TYPES.get(hf.model_type)
        if arch is None:
            raise ValueError(
                f"model_type {hf.model_type!r} is not supported; "
                f"supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        eos = _eos_ids(hf.eos_token_id)
        try:
            gen = GenerationConfig.from_pretrained(str(model_dir))
            eos = _eos_ids(gen.eos_token_id) or eos
        except OSError:
            pass
        if arch == "opt":
            return cls._from_opt(hf, eos)
        heads = hf.num_attention_heads
        window = getattr(hf, "sliding_window", None)
        if hf.model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
            window = None
        return cls(
            model_type=hf.model_type,
            arch=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            sliding_window=window,
            eos_token_ids=eos,
            bos_token_id=hf.bos_token_id,
        )

    @classmethod
    def _from_opt(cls, hf, eos: tuple[int, ...]) -> ModelConfig:
        if not hf.do_layer_norm_before or hf.word_embed_proj_dim != hf.hidden_size:
            raise ValueError(
                "only pre-LN OPT models without embedding projection (OPT-125m, 1.3b and "
                "larger, except 350m) are supported"
            )
        return cls(
            model_type="opt",
            arch="opt",
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_attention_heads,
            head_dim=hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.ffn_dim,
            max_position_embeddings=hf.max_position_embeddings,
            norm_eps=1e-5,
            tie_word_embeddings=True,
            qkv_bias=True,
            eos_token_ids=eos,
            bos_token_id=hf.bos_token_id,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 bytes of K and V per token across all layers (scale by dtype size / 4)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


def _eos_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def preferred_dtype() -> Literal["float32", "bfloat16"]:
    """bfloat16 where the CPU has native bf16 dot products (AVX512-BF16, AMX), else float32."""
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


class EngineConfig(AlignedKnobs):
    """Knobs of one engine instance (one process). Every field is user-facing; the aligned
    policy's batching knobs are inherited from `AlignedKnobs`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Path to an HF-format model folder (config.json + safetensors).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights, activations and KV dtype. auto: bfloat16 on CPUs with native "
        "bf16 math (AVX512-BF16 or AMX), where its GEMMs run 2-6x faster, else float32. "
        "Resolved when the config is built, so every process of a deployment agrees.",
        validate_default=True,
    )
    policy: Literal["fcfs", "aligned"] = Field(
        "fcfs",
        description="Batch policy. fcfs: vLLM-style continuous batching (the baseline). "
        "aligned: prefix-aware batching of close KV lengths over a host KV pool.",
    )
    block_size: int = Field(32, ge=1, le=1024, description="Tokens per KV block. 32, as "
                            "vLLM's CPU attention requires: a decode step at 64 members is "
                            "2-6% shorter than with 16 (BENCHMARKS.md, issue 12).")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="Device KV pool size in blocks; None sizes it from kv_cache_gib."
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="Device KV pool size in GiB, used when num_kv_blocks is None."
    )
    max_num_seqs: int = Field(64, ge=1, description="Requests in one step at most.")
    max_num_batched_tokens: int = Field(
        1024, ge=16, description="Tokens (prefill chunk + decodes) in one step at most."
    )
    long_prefill_token_threshold: int | None = Field(
        None, ge=1, description="fcfs: a running request's prefill takes at most this many "
        "tokens per step, leaving the rest of the budget to newer requests' first chunks "
        "(vLLM's knob). None: a chunk may take the whole budget.",
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Context length cap; default min(model limit, KV pool tokens)."
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads for this process; None keeps torch's."
    )
    attention_backend: Literal["auto", "paged", "dense", "varlen"] = Field(
        "auto",
        description="Decode attention: paged reads KV blocks in place (the C++ kernel), dense "
        "pads to the longest KV (one SDPA call), varlen runs one call per sequence; auto "
        "takes paged where the kernel builds, else picks dense/varlen per batch from the "
        "KV-length spread.",
    )
    prefill_attention: Literal["auto", "kernel", "sdpa"] = Field(
        "auto",
        description="Prefill attention: kernel runs chunks through the paged C++ kernel where "
        "it takes them (CPU, fp32 or bf16 with AVX512-BF16, head dim a multiple of 32, "
        "blocks of 16 or 32) and through torch's SDPA elsewhere; sdpa always uses SDPA; "
        "auto is kernel, except bf16 on a CPU with AMX, where SDPA (on AMX tiles) is faster.",
    )
    dense_max_padding: float = Field(
        0.25,
        ge=0.0,
        description="auto backend: use dense when padding adds at most this fraction of "
        "attention work over the real KV tokens, or at most dense_max_pad_tokens per sequence.",
    )
    dense_max_pad_tokens: int = Field(
        192,
        ge=0,
        description="auto backend: dense is also chosen when the mean padding per sequence is "
        "at most this many tokens. Measured here: one extra SDPA call per sequence (varlen) "
        "costs about as much as ~200 padded KV tokens.",
    )
    seed: int = Field(0, description="Seed for requests sampled without their own seed.")
    # -- aligned policy (ignored by fcfs); its batching knobs come from AlignedKnobs --
    host_kv_gib: float = Field(
        4.0, gt=0.0, description="aligned: host KV pool size in GiB (the in-flight set lives "
        "here); when it is full, new requests wait.",
    )
    host_kv_blocks: int | None = Field(
        None, ge=1, description="aligned: host KV pool size in blocks; None sizes it from "
        "host_kv_gib.",
    )

    @field_validator("dtype", mode="after")
    @classmethod
    def _resolve_dtype(cls, value: str) -> str:
        return preferred_dtype() if value == "auto" else value

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be >= block_size")
        return self
