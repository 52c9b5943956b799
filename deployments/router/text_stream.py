"""Token ids -> text deltas for one request, with stop strings applied.

Invariant: the deltas, concatenated, equal `final_text(...)` of the whole output, which is
what the in-process engine returns. Text that could be the beginning of a stop string is
held back until the next token settles it; the last delta is whatever the final text adds
to what was sent.
"""

from __future__ import annotations

from alignedserve.engine.tokenizer import IncrementalDetokenizer, final_text, find_stop
from alignedserve.scheduling.sampling_params import SamplingParams


class TextStream:
    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.tok = tokenizer
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop string was seen: later tokens add no text
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    def push(self, token_ids: tuple[int, ...] | list[int]) -> str:
        """Add new output ids; return the text that may be sent now (maybe empty)."""
        before = len(self.detok.text)
        for t in token_ids:
            self.ids.append(t)
            self.detok.push(t)
        if self.stopped:
            return ""
        text = self.detok.text
        # Only the new characters can complete a stop string: O(new) per push, not O(text).
        new_chars = len(text) - before
        if self.params.stop and find_stop(text, self.params.stop, new_chars) is not None:
            self.stopped = True
            return self._advance(final_text(self.tok, self.ids, self.params))
        return self._advance(text[: len(text) - self._hold] if self._hold else text)

    def finish(self) -> str:
        """The rest of the text once the request has ended."""
        return self._advance(final_text(self.tok, self.ids, self.params))

    def _advance(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        delta = upto[len(self.sent):]
        self.sent = upto
        return delta

    @property
    def text(self) -> str:
        return final_text(self.tok, self.ids, self.params)
