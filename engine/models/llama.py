"""Llama-family forward (Llama, Qwen2, Mistral): RMSNorm, RoPE, GQA, SwiGLU.

Numerics follow transformers' implementation (norms in fp32, RoPE tables in fp32 cast to
the activation dtype) so greedy decoding matches it token for token in fp32. q/k/v and
gate/up projections are fused into one GEMM each. A bf16 model on the CPU runs the
elementwise steps (residual add + RMSNorm, RoPE, SiLU * up) through the fused C++ ops of
`engine/csrc/fused_ops.cpp` (`FusedBf16Ops`); fp32 keeps torch's ops (`TorchOps`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from alignedserve.engine.attention import AttentionStep
from alignedserve.engine.config import ModelConfig
from alignedserve.engine.linear import Linear
from alignedserve.engine.native import kernels
from alignedserve.engine.weights import load_state_dict, take


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_tables(model_dir: str | Path, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_pos, head_dim] fp32, computed exactly as transformers does."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = AutoConfig.from_pretrained(str(model_dir))
    rope_type = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, dim]; cos, sin: [T, 1, dim] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def split_qkv(qkv, cfg: ModelConfig):
    """Views of the fused projection's rows: q [T, heads, dim], k and v [T, kv_heads, dim]."""
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return (qkv[:, :nq].view(-1, cfg.num_heads, cfg.head_dim),
            qkv[:, nq : nq + nkv].view(-1, cfg.num_kv_heads, cfg.head_dim),
            qkv[:, nq + nkv :].view(-1, cfg.num_kv_heads, cfg.head_dim))


class TorchOps:
    """The elementwise steps in torch, in transformers' order and rounding."""

    def rope_tables(self, cos, sin, positions, dtype):
        return cos[positions].to(dtype)[:, None, :], sin[positions].to(dtype)[:, None, :]

    def qkv_rope(self, qkv, tables, cfg: ModelConfig):
        q, k, v = split_qkv(qkv, cfg)
        cos, sin = tables
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def norm(self, x, weight, eps):
        return rms_norm(x, weight, eps)

    def add_norm(self, h, delta, weight, eps):
        """(h + delta, rms_norm(h + delta))."""
        h = h + delta
        return h, rms_norm(h, weight, eps)

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class FusedBf16Ops(TorchOps):
    """The same steps as one C++ pass each (bf16 activations): RoPE in place on the qkv
    rows, the residual add fused into the next norm (h updated in place)."""

    def __init__(self, mod: ModuleType) -> None:
        self.mod = mod

    def rope_tables(self, cos, sin, positions, dtype):
        return cos[positions].contiguous(), sin[positions].contiguous()  # fp32, rounded in C++

    def qkv_rope(self, qkv, tables, cfg: ModelConfig):
        heads = cfg.num_heads + cfg.num_kv_heads
        self.mod.rope_bf16_(qkv, tables[0], tables[1], heads, cfg.head_dim)
        return split_qkv(qkv, cfg)

    def norm(self, x, weight, eps):
        return self.mod.rms_norm_bf16(x, weight, eps)

    def add_norm(self, h, delta, weight, eps):
        return h, self.mod.add_rms_norm_bf16(h, delta, weight, eps)

    def silu_mul(self, gate_up):
        return self.mod.silu_mul_bf16(gate_up)


def elementwise_ops(dtype: torch.dtype, device: torch.device) -> TorchOps:
    """FusedBf16Ops for a bf16 model on the CPU where the C++ kernels build (unless
    ALIGNEDSERVE_NO_FUSED=1), else TorchOps."""
    mod = kernels() if device.type == "cpu" and dtype == torch.bfloat16 else None
    if mod is None or os.environ.get("ALIGNEDSERVE_NO_FUSED") == "1":
        return TorchOps()
    return FusedBf16Ops(mod)


@dataclass
class LlamaLayer:
    in_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [(heads + 2*kv_heads) * head_dim, hidden], with the qkv bias if any
    o: Linear  # [hidden, heads*head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2*intermediate, hidden]
    down: Linear  # [hidden, intermediate]


class LlamaForCausalLM:
    def __init__(
        self, cfg: ModelConfig, embed: torch.Tensor, layers: list[LlamaLayer],
        norm: torch.Tensor, lm_head: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    ) -> None:
        self.cfg = cfg
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.norm = norm
        self.lm_head = Linear(lm_head)  # [vocab, hidden], may be the same tensor as embed
        self.cos, self.sin = cos, sin  # [max_pos, head_dim] fp32
        self.scale = cfg.head_dim**-0.5
        self.ops = elementwise_ops(embed.dtype, embed.device)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype
    ) -> LlamaForCausalLM:
        sd = load_state_dict(model_dir, dtype)
        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = [take(sd, f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
            bias = None
            if cfg.qkv_bias:
                bias = torch.cat([take(sd, f"{p}self_attn.{n}_proj.bias") for n in "qkv"])
            gate, up = take(sd, f"{p}mlp.gate_proj.weight"), take(sd, f"{p}mlp.up_proj.weight")
            layers.append(LlamaLayer(
                in_norm=take(sd, f"{p}input_layernorm.weight"),
                qkv=Linear(torch.cat(qkv).contiguous(), bias),
                o=Linear(take(sd, f"{p}self_attn.o_proj.weight")),
                post_norm=take(sd, f"{p}post_attention_layernorm.weight"),
                gate_up=Linear(torch.cat([gate, up]).contiguous()),
                down=Linear(take(sd, f"{p}mlp.down_proj.weight")),
            ))
        embed = take(sd, "model.embed_tokens.weight")
        lm_head = sd.pop("lm_head.weight", None)
        if lm_head is None or cfg.tie_word_embeddings:
            lm_head = embed
        cos, sin = rope_tables(model_dir, cfg.max_position_embeddings)
        return cls(cfg, embed, layers, take(sd, "model.norm.weight"), lm_head, cos, sin)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionStep
    ) -> torch.Tensor:
        cfg, ops, eps = self.cfg, self.ops, self.cfg.norm_eps
        h = self.embed[input_ids]  # [T, hidden], a new tensor (the fused ops update it)
        tables = ops.rope_tables(self.cos, self.sin, positions, h.dtype)
        x = ops.norm(h, self.layers[0].in_norm, eps)
        for i, layer in enumerate(self.layers):
            q, k, v = ops.qkv_rope(layer.qkv(x), tables, cfg)
            h, x = ops.add_norm(h, layer.o(attn.forward(i, q, k, v, self.scale)),
                                layer.post_norm, eps)
            # The residual add of the MLP goes with the next layer's input norm (the
            # model's final norm after the last layer).
            nxt = self.layers[i + 1].in_norm if i + 1 < len(self.layers) else self.norm
            h, x = ops.add_norm(h, layer.down(ops.silu_mul(layer.gate_up(x))), nxt, eps)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
