"""Llama-family forward (Llama, Qwen2, Mistral): RMSNorm, RoPE, GQA, SwiGLU.

Numerics follow transformers' implementation (norms in fp32, RoPE tables in fp32 cast to
the activation dtype) so greedy decoding matches it token for token in fp32. q/k/v and
gate/up projections are fused into one GEMM each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alignedserve.engine.attention import AttentionStep
from alignedserve.engine.config import ModelConfig
from alignedserve.engine.linear import Linear
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
        cfg = self.cfg
        h = self.embed[input_ids]  # [T, hidden]
        cos = self.cos[positions].to(h.dtype)[:, None, :]  # [T, 1, head_dim]
        sin = self.sin[positions].to(h.dtype)[:, None, :]
        nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.in_norm, cfg.norm_eps)
            qkv = layer.qkv(x)
            q = qkv[:, :nq].view(-1, cfg.num_heads, cfg.head_dim)
            k = qkv[:, nq : nq + nkv].view(-1, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, nq + nkv :].view(-1, cfg.num_kv_heads, cfg.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            h = h + layer.o(attn.forward(i, q, k, v, self.scale))
            x = rms_norm(h, layer.post_norm, cfg.norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        return rms_norm(h, self.norm, cfg.norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
