"""OpenAI response bodies from a request's outputs: whole responses, SSE chunks and streams,
usage, and log-probabilities in both of OpenAI's formats (chat and completions)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from warmserve.clock import unix_time
from warmserve.engine.request import TokenLogprobs
from warmserve.gateway.serving import ApiError, Delta, Generation, ModelCard, Prepared
from warmserve.runtime.requests import RuntimeRequest


def usage(prep: Prepared, reqs: Sequence[RuntimeRequest]) -> dict[str, int]:
    """Each distinct prompt counts once (as OpenAI counts `n` choices)."""
    prompts = {g.prompt_index: len(r.prompt_ids) for g, r in zip(prep.gens, reqs, strict=True)}
    prompt = sum(prompts.values())
    completion = sum(r.generated for r in reqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----- log-probabilities in OpenAI's two formats --------------------------------------
def chat_logprobs(card: ModelCard, lps: Sequence[tuple[int, TokenLogprobs]]) -> dict[str, Any]:
    tt = card.token_text
    assert tt is not None

    def entry(tok: int, lp: float) -> dict[str, Any]:
        text, data = tt.get(tok)
        return {"token": text, "logprob": lp, "bytes": data}

    return {
        "content": [
            {**entry(tok, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for tok, lp in lps
        ]
    }


def completion_logprobs(
    card: ModelCard, lps: Sequence[tuple[int, TokenLogprobs | None]], offset: int
) -> dict[str, Any]:
    tt = card.token_text
    assert tt is not None
    tokens, offsets = [], []
    for tok, _ in lps:
        text, _ = tt.get(tok)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else lp.logprob for _, lp in lps],
        # Several top tokens may decode to the same text: the first (most likely) one wins.
        "top_logprobs": [
            None if lp is None else {tt.get(t)[0]: v for t, v in reversed(lp.top)} for _, lp in lps
        ],
        "text_offset": offsets,
    }


def join_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two parts of a completion's log-probabilities (the echoed prompt, the output)."""
    return {k: a[k] + b[k] for k in a}


# ----- whole responses ----------------------------------------------------------------
@dataclass(slots=True)
class Collected:
    text: str
    finish: str
    logprobs: list[tuple[int, TokenLogprobs]]
    prompt: list[tuple[int, TokenLogprobs | None]] | None = None


async def collect(events: AsyncIterator[Delta]) -> Collected:
    """The whole text, finish reason and log-probabilities of one choice."""
    parts: list[str] = []
    lps: list[tuple[int, TokenLogprobs]] = []
    prompt = None
    reason = "stop"
    async for d in events:
        parts.append(d.text)
        lps.extend(d.logprobs)
        prompt = prompt or d.prompt
        if d.finish is not None:
            reason = d.finish
    return Collected("".join(parts), reason, lps, prompt)


async def collect_all(streams: list[AsyncIterator[Delta]]) -> list[Collected]:
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one failed (or the client left): the others stop too
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()


def response(
    rid: str, prep: Prepared, results: list[Collected], reqs: list[RuntimeRequest]
) -> dict[str, Any]:
    card = prep.model
    choices = []
    for g, res in zip(prep.gens, results, strict=True):
        if prep.chat:
            choices.append({
                "index": g.index,
                "message": {"role": "assistant", "content": res.text},
                "logprobs": chat_logprobs(card, res.logprobs) if prep.logprobs is not None
                else None,
                "finish_reason": res.finish,
            })  # fmt: skip
        else:
            head = g.prompt_text if prep.echo else ""
            lp = None
            if prep.logprobs is not None:
                lp = completion_logprobs(card, res.logprobs, len(head))
                if res.prompt is not None:
                    lp = join_logprobs(completion_logprobs(card, res.prompt, 0), lp)
            choices.append(
                {
                    "index": g.index,
                    "text": head + res.text,
                    "logprobs": lp,
                    "finish_reason": res.finish,
                }
            )
    return {
        "id": rid,
        "object": "chat.completion" if prep.chat else "text_completion",
        "created": unix_time(),
        "model": card.name,
        "choices": choices,
        "usage": usage(prep, reqs),
    }


# ----- streams ------------------------------------------------------------------------
def chunk(
    rid: str, prep: Prepared, created: int, g: Generation, d: Delta | None, offsets: list[int]
) -> dict[str, Any]:
    """One SSE chunk; `d is None` is a chat choice's first chunk (the role)."""
    card = prep.model
    if prep.chat:
        if d is None:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
            lp, fin = None, None
        else:
            delta, fin = {"content": d.text}, d.finish
            lp = (chat_logprobs(card, d.logprobs)
                  if prep.logprobs is not None and d.logprobs else None)  # fmt: skip
        choice = {"index": g.index, "delta": delta, "logprobs": lp, "finish_reason": fin}
        obj = "chat.completion.chunk"
    else:
        assert d is not None
        lp = None
        if prep.logprobs is not None and d.logprobs:
            lp = completion_logprobs(card, d.logprobs, offsets[g.index])
        offsets[g.index] += len(d.text)
        choice = {"index": g.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": card.name,
            "choices": [choice]}  # fmt: skip


async def first_events(streams: list[AsyncIterator[Delta]]) -> list[Delta | None]:
    """Each choice's first delta, so an error before any output still gets a real status."""

    async def one(s: AsyncIterator[Delta]) -> Delta | None:
        try:
            return await anext(s)
        except StopAsyncIteration:
            return None

    tasks = [asyncio.ensure_future(one(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice, delta) from every stream as they come; each stream's order is kept."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    d = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, d
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def stream_sse(
    rid: str,
    prep: Prepared,
    reqs: list[RuntimeRequest],
    streams: list[AsyncIterator[Delta]],
    firsts: list[Delta | None],
) -> AsyncIterator[str]:
    """SSE lines: per choice a role chunk (chat) and its first delta (already awaited), then
    every further delta as it comes, the usage if asked, [DONE]. An error after the headers
    travels as an error event, followed by [DONE]."""
    created = unix_time()
    offsets = [0] * len(prep.gens)  # characters of each choice's text sent so far
    try:
        for g, first in zip(prep.gens, firsts, strict=True):
            if prep.chat:
                yield sse(chunk(rid, prep, created, g, None, offsets))
            if prep.echo and g.prompt_text:
                echoed = Delta(g.prompt_text, None, (first.prompt or []) if first else [])
                yield sse(chunk(rid, prep, created, g, echoed, offsets))
            if first is not None:
                yield sse(chunk(rid, prep, created, g, first, offsets))
        going = [k for k, f in enumerate(firsts) if f is not None and f.finish is None]
        async for i, d in merge([streams[k] for k in going]):
            yield sse(chunk(rid, prep, created, prep.gens[going[i]], d, offsets))
    except ApiError as e:  # headers are sent: the error travels as an event
        yield sse(e.body)
        yield "data: [DONE]\n\n"
        return
    finally:
        for s in streams:  # a client gone mid-stream: every choice is aborted here
            with contextlib.suppress(Exception):
                await s.aclose()
    if prep.include_usage:
        yield sse({"id": rid, "object": "chat.completion.chunk" if prep.chat
                   else "text_completion", "created": created, "model": prep.model.name,
                   "choices": [], "usage": usage(prep, reqs)})  # fmt: skip
    yield "data: [DONE]\n\n"
