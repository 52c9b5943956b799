"""Forward passes of the supported model families, written against the paged KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from alignedserve.engine.attention import AttentionStep
from alignedserve.engine.config import ModelConfig


class CausalLM(Protocol):
    """A decoder-only model over a flat batch of tokens.

    forward: input_ids [T], positions [T] -> hidden [T, hidden]
    logits: hidden [N, hidden] -> [N, vocab] (float32)
    """

    cfg: ModelConfig

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionStep
    ) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def load_model(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> CausalLM:
    from alignedserve.engine.models.llama import LlamaForCausalLM
    from alignedserve.engine.models.opt import OPTForCausalLM

    if cfg.arch == "opt":
        return OPTForCausalLM.from_pretrained(model_dir, cfg, dtype)
    return LlamaForCausalLM.from_pretrained(model_dir, cfg, dtype)
