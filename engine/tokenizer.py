"""Tokenizer glue: loading, chat templates and incremental detokenization."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    """The HF fast tokenizer of a model folder (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas.

    Decodes only a short window (from `prefix` to the end) per step, so the cost does not
    grow with the output. A delta ending in U+FFFD (an incomplete UTF-8 sequence) is held
    back until the next token completes it.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already emitted; they give decode context
        self.read = 0
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly readable text (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: tuple[str, ...], new_chars: int) -> int | None:
    """Index in `text` where the earliest stop string starts, looking only where the last
    `new_chars` characters could have completed one; None if none."""
    if not stops:
        return None
    lo = max(0, len(text) - new_chars - max(len(s) for s in stops) + 1)
    hits = [i for s in stops if (i := text.find(s, lo)) != -1]
    return min(hits) if hits else None


def final_text(tokenizer, output_ids: list[int], params) -> str:
    """A finished request's text: its output decoded, cut before the earliest stop string
    (or after it, with `include_stop_str_in_output`). `params`: SamplingParams."""
    text = tokenizer.decode(output_ids, skip_special_tokens=params.skip_special_tokens)
    cut = find_stop(text, params.stop, len(text))
    if cut is None:
        return text
    if params.include_stop_str_in_output:
        stop = min((s for s in params.stop if text.startswith(s, cut)), key=len)
        return text[: cut + len(stop)]
    return text[:cut]
