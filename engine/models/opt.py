"""OPT forward (the family the AlignedServe paper evaluated): MHA, learned positions,
pre-LayerNorm, ReLU FFN, biases everywhere, tied LM head.

As in transformers, q is scaled before the attention product (attention scale 1.0).
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

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


@dataclass
class OPTLayer:
    attn_norm: tuple[torch.Tensor, torch.Tensor]  # LayerNorm (weight, bias), [hidden] each
    qkv: Linear  # [3*hidden, hidden] + [3*hidden]
    out: Linear  # [hidden, hidden] + [hidden]
    ffn_norm: tuple[torch.Tensor, torch.Tensor]
    fc1: Linear  # [ffn, hidden] + [ffn]
    fc2: Linear  # [hidden, ffn] + [hidden]


def _pair(sd: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return take(sd, prefix + ".weight"), take(sd, prefix + ".bias")


class OPTForCausalLM:
    def __init__(
        self, cfg: ModelConfig, embed: torch.Tensor, pos_embed: torch.Tensor,
        layers: list[OPTLayer], final_norm: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self.cfg = cfg
        self.embed = embed  # [vocab, hidden], also the LM head
        self.lm_head = Linear(embed)
        self.pos_embed = pos_embed  # [max_pos + 2, hidden]
        self.layers = layers
        self.final_norm = final_norm
        self.q_scale = cfg.head_dim**-0.5

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype
    ) -> OPTForCausalLM:
        sd = load_state_dict(model_dir, dtype)
        layers = []
        for i in range(cfg.num_layers):
            p = f"model.decoder.layers.{i}."
            qkv = [_pair(sd, f"{p}self_attn.{n}_proj") for n in "qkv"]
            layers.append(OPTLayer(
                attn_norm=_pair(sd, p + "self_attn_layer_norm"),
                qkv=Linear(torch.cat([w for w, _ in qkv]).contiguous(),
                           torch.cat([b for _, b in qkv])),
                out=Linear(*_pair(sd, p + "self_attn.out_proj")),
                ffn_norm=_pair(sd, p + "final_layer_norm"),
                fc1=Linear(*_pair(sd, p + "fc1")),
                fc2=Linear(*_pair(sd, p + "fc2")),
            ))
        return cls(
            cfg, take(sd, "model.decoder.embed_tokens.weight"),
            take(sd, "model.decoder.embed_positions.weight"), layers,
            _pair(sd, "model.decoder.final_layer_norm"),
        )

    def _norm(self, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), wb[0], wb[1], self.cfg.norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionStep
    ) -> torch.Tensor:
        cfg = self.cfg
        hid = cfg.hidden_size
        h = self.embed[input_ids] + self.pos_embed[positions + POSITION_OFFSET]
        for i, layer in enumerate(self.layers):
            x = self._norm(h, layer.attn_norm)
            qkv = layer.qkv(x)
            q = (qkv[:, :hid] * self.q_scale).view(-1, cfg.num_heads, cfg.head_dim)
            k = qkv[:, hid : 2 * hid].view(-1, cfg.num_heads, cfg.head_dim)
            v = qkv[:, 2 * hid :].view(-1, cfg.num_heads, cfg.head_dim)
            h = h + layer.out(attn.forward(i, q, k, v, 1.0))
            x = self._norm(h, layer.ffn_norm)
            h = h + layer.fc2(F.relu(layer.fc1(x)))
        return self._norm(h, self.final_norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
