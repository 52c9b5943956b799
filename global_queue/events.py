"""Token events: what a request's stream carries (`p tok:{id}`), and what the router's
front ends consume. One type for both sides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import redis

from alignedserve.global_queue.keys import RedisKeys

STREAM_TTL_S = 600  # token streams outlive their request this long (late readers, resume)


@dataclass(frozen=True)
class TokenEvent:
    """New output of one request. Events of a request arrive in order; the last one has
    `finish_reason` set (or `error`)."""

    token_ids: tuple[int, ...]  # output ids new since the previous event (may be empty)
    num_output_tokens: int  # output ids so far, cumulative
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last event
    logprobs: tuple[float, ...] | None = None  # one per id in token_ids, if asked for
    error: str | None = None  # the backend failed this request; ends the stream

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def to_fields(self) -> dict[str, str]:
        f = {"ids": " ".join(map(str, self.token_ids)), "n": str(self.num_output_tokens)}
        if self.finish_reason:
            f["f"] = self.finish_reason
        if self.logprobs is not None:
            f["lp"] = json.dumps(self.logprobs)
        if self.error:
            f["err"] = self.error
        return f

    def past(self, have: int) -> TokenEvent | None:
        """This event without the tokens a reader that has `have` output tokens already
        got; None when it carries nothing new (a duplicate: a retried write, a zombie
        holder). Events without tokens (errors) always pass."""
        if not self.token_ids:
            return self
        new = self.num_output_tokens - have
        if new <= 0:
            return None
        if new >= len(self.token_ids):
            return self
        lp = self.logprobs[-new:] if self.logprobs is not None else None
        return dataclasses.replace(self, token_ids=self.token_ids[-new:], logprobs=lp)

    @classmethod
    def from_fields(cls, f: dict[bytes, bytes]) -> TokenEvent:
        ids = f.get(b"ids", b"").split()
        lp = f.get(b"lp")
        return cls(tuple(int(i) for i in ids), int(f[b"n"]),
                   f[b"f"].decode() if b"f" in f else None,
                   tuple(json.loads(lp)) if lp else None,
                   f[b"err"].decode() if b"err" in f else None)


def publish(pipe: redis.client.Pipeline, keys: RedisKeys, rid: str, ev: TokenEvent) -> None:
    """Queue one token event on `pipe` (the caller executes it, once per step). A final
    event also schedules the stream's expiry and deletes the request record."""
    pipe.xadd(keys.tok(rid), ev.to_fields())
    if ev.final:
        pipe.expire(keys.tok(rid), STREAM_TTL_S)
        pipe.delete(keys.req(rid))


def replay(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> tuple[list[int], bool]:
    """A stream's entries (XRANGE) as (the output ids so far, whether it has ended). Each
    token counts once, by its cumulative count, however often it was published."""
    out: list[int] = []
    final = False
    for _, fields in entries:
        ev = TokenEvent.from_fields(fields)
        final = final or ev.final
        if (new := ev.past(len(out))) is not None:
            out.extend(new.token_ids)
    return out, final
