"""The ground truth for greedy outputs: transformers' `generate` on the same weights."""

from __future__ import annotations

from functools import cache

import torch


@cache
def hf_greedy(model_dir: str, prompts: tuple[tuple[int, ...], ...], new_tokens: int = 32,
              ignore_eos: bool = False) -> list[list[int]]:
    """transformers' greedy decoding in fp32, one prompt at a time (no padding effects):
    `generate`, or with `ignore_eos` (EOS may be generated but does not stop, vLLM's
    meaning; `min_new_tokens` would forbid it instead) the same argmax loop by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            if ignore_eos:
                out.append(_argmax_loop(model, ids, new_tokens))
                continue
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                do_sample=False, pad_token_id=pad,
            )
            out.append(gen[0, len(p) :].tolist())
    return out


def _argmax_loop(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    got: list[int] = []
    past, step = None, ids
    for _ in range(new_tokens):
        res = model(step, past_key_values=past, use_cache=True)
        past = res.past_key_values
        got.append(int(res.logits[0, -1].argmax()))
        step = torch.tensor([[got[-1]]])
    return got
