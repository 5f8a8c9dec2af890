"""Chat and text completions: validate, tokenize, submit, then stream or collect.

Handlers reach the serving runtime only through `EngineClient`. Per-request state lives in
locals. Whatever ends a request early (client gone, stop string, error) aborts it in the
runtime, which frees its KV at once.

Tokenising and chat templating run on a small thread pool, never on the event loop: one large
prompt must not stall every other stream (the tokenizers library releases the GIL). Prompts
that cannot fit the context are refused by their length in characters before any of that.

A request may ask for several generations (`n`, and a batch of prompts on `/v1/completions`):
each is its own runtime request, and their outputs are merged by choice index.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from warmserve.clock import unix_time
from warmserve.engine.request import SEED_MAX, SEED_MIN, SamplingParams, TokenLogprobs
from warmserve.gateway.protocol import ChatCompletionRequest, CompletionRequest, error_body
from warmserve.gateway.text import IncrementalText, TokenText
from warmserve.runtime.requests import (
    Overloaded,
    RuntimeRequest,
    ShuttingDown,
    StreamError,
    TokenDelta,
)


class EngineClient(Protocol):
    @property
    def accepting(self) -> bool: ...

    def submit(
        self, model: str, prompt_ids: list[int], params: SamplingParams
    ) -> RuntimeRequest: ...

    def abort(self, request_id: int, reason: str = "client") -> None: ...

    def model_state(self, name: str) -> str: ...

    def admin_view(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ModelCard:
    name: str
    tokenizer: Any
    max_model_len: int
    created: int
    # A prompt longer than this (in characters) cannot fit the context, whatever it holds:
    # no token covers more characters than the longest one in the vocabulary.
    max_prompt_chars: int = 0
    token_text: TokenText | None = None

    @staticmethod
    def build(name: str, tokenizer: Any, max_model_len: int, created: int) -> ModelCard:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        return ModelCard(name, tokenizer, max_model_len, created,
                         max_model_len * max(1, longest), TokenText(tokenizer))  # fmt: skip


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind, param, code)


@dataclass(slots=True)
class Generation:
    """One choice: a prompt and the parameters to sample it with."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str  # for `echo`
    prompt_index: int


@dataclass(slots=True)
class Prepared:
    model: ModelCard
    gens: list[Generation]
    stop: list[str]
    include_usage: bool
    stream: bool
    logprobs: int | None  # None: off; k: the chosen token's log-probability and the top k
    echo: bool = False
    chat: bool = False


@dataclass(slots=True)
class Delta:
    """New output of one choice: text, the log-probabilities of the tokens that produced it,
    and the finish reason at the end."""

    text: str
    finish: str | None
    logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
    # With the first delta of an echoed request that asked for log-probabilities: each prompt
    # token with its log-probability (None for the first, which nothing predicts).
    prompt: list[tuple[int, TokenLogprobs | None]] | None = None


class OpenAIServing:
    def __init__(
        self,
        engine: EngineClient,
        models: list[ModelCard],
        default_max_tokens: int,
        tokenizer_threads: int = 2,
    ) -> None:
        self.engine = engine
        self.models = {m.name: m for m in models}
        self.default_max_tokens = default_max_tokens
        self._pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ----- preparing (on the tokenizer pool) ---------------------------------------------
    async def prepare(self, body: ChatCompletionRequest | CompletionRequest) -> Prepared:
        card = self._model(body.model)  # a 404 needs no thread
        fn = self.prepare_chat if isinstance(body, ChatCompletionRequest) else (
            self.prepare_completion)  # fmt: skip
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, body, card)

    def _model(self, name: str) -> ModelCard:
        card = self.models.get(name)
        if card is None:
            shown = name if len(name) <= 100 else name[:100] + "…"
            raise ApiError(404, f"The model `{shown}` does not exist.", "NotFoundError",
                           "model", "model_not_found")  # fmt: skip
        return card

    def _too_long(self, card: ModelCard, chars: int, param: str) -> None:
        if chars > card.max_prompt_chars:
            raise ApiError(
                400,
                f"This model's maximum context length is {card.max_model_len} tokens; the "
                f"prompt has {chars} characters, more than any prompt that fits "
                f"({card.max_prompt_chars}).",
                param=param,
                code="context_length_exceeded",
            )

    def _params(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        ids: list[int],
        card: ModelCard,
        max_tokens: int | None,
        param: str,
        choice: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        room = card.max_model_len - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {card.max_model_len} "
                f"tokens; the prompt has {len(ids)} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        if max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {card.max_model_len} "
                f"tokens; the prompt ({len(ids)}) plus max_tokens ({max_tokens}) "
                "exceeds it.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        seed = body.seed
        if seed is not None and choice:  # the n choices of a seeded request differ, repeatably
            seed = (seed - SEED_MIN + choice) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=seed,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def prepare_chat(self, body: ChatCompletionRequest, card: ModelCard) -> Prepared:
        self._too_long(card, sum(len(m.text()) for m in body.messages), "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = card.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as e:  # a template that rejects the conversation (e.g. roles)
            why = str(e)[:300] if type(e).__name__ == "TemplateError" else type(e).__name__
            raise ApiError(400, f"the model's chat template rejects these messages: {why}",
                           param="messages") from None  # fmt: skip
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        gens = [
            Generation(
                i, ids, self._params(body, ids, card, max_tokens, "messages", i, logprobs), "", 0
            )
            for i in range(body.n)
        ]
        include = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(card, gens, body.stop_strings(), include, body.stream, logprobs,
                        chat=True)  # fmt: skip

    def prepare_completion(self, body: CompletionRequest, card: ModelCard) -> Prepared:
        prompts = body.prompts()
        self._too_long(card, sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
        vocab = len(card.tokenizer)
        gens: list[Generation] = []
        for k, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                # With the tokenizer's special tokens (a BOS where the model expects one, as
                # Gemma does), as vLLM encodes completion prompts; token-id prompts go as given.
                ids = card.tokenizer.encode(prompt, add_special_tokens=True)
                text = prompt
            else:
                if any(not 0 <= t < vocab for t in prompt):
                    raise ApiError(400, f"prompt token ids must lie in [0, {vocab})",
                                   param="prompt")  # fmt: skip
                ids = list(prompt)
                text = card.tokenizer.decode(ids) if body.echo else ""
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            for i in range(body.n):
                params = self._params(body, ids, card, body.max_tokens, "prompt", i, body.logprobs,
                                      body.logprobs if body.echo else None)  # fmt: skip
                gens.append(Generation(len(gens), ids, params, text, k))
        include = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(card, gens, body.stop_strings(), include, body.stream, body.logprobs,
                        echo=body.echo)  # fmt: skip

    def submit(self, prep: Prepared) -> list[RuntimeRequest]:
        reqs: list[RuntimeRequest] = []
        try:
            for g in prep.gens:
                reqs.append(self.engine.submit(prep.model.name, g.prompt_ids, g.params))
        except (Overloaded, ShuttingDown) as e:
            for r in reqs:  # all or nothing
                self.engine.abort(r.request_id)
            if isinstance(e, Overloaded):
                raise ApiError(429, str(e), "rate_limit_error") from None
            raise ApiError(503, str(e), "server_error") from None
        return reqs

    # ----- running ----------------------------------------------------------------------
    async def events(self, req: RuntimeRequest, prep: Prepared) -> AsyncIterator[Delta]:
        """Deltas until the end; raises ApiError on a runtime error. Aborts the request in
        the runtime if the consumer stops early."""
        text = IncrementalText(prep.model.tokenizer, prep.stop)
        finished = False
        pending: list[tuple[int, TokenLogprobs]] = []
        prompt: list[tuple[int, TokenLogprobs | None]] | None = None
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, StreamError):
                    finished = True
                    raise ApiError(item.status, item.message, item.kind)
                assert isinstance(item, TokenDelta)
                if item.logprobs is not None:
                    pending.extend(zip(item.token_ids, item.logprobs, strict=True))
                if item.prompt_logprobs is not None:
                    ids = req.prompt_ids
                    prompt = [(ids[0], None), *zip(ids[1:], item.prompt_logprobs, strict=True)]
                delta = text.push(item.token_ids)
                if text.stopped:
                    finished = True
                    self.engine.abort(req.request_id, "stop")
                    yield Delta(delta, "stop", pending, prompt)
                    return
                if item.finish_reason is not None:
                    finished = True
                    yield Delta(delta + text.flush(), item.finish_reason, pending, prompt)
                    return
                if delta:
                    yield Delta(delta, None, pending, prompt)
                    pending, prompt = [], None
        finally:
            if not finished:
                self.engine.abort(req.request_id)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


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


async def wait_disconnect(receive: Callable[[], Any]) -> None:
    """Returns when the client disconnects (the request body was already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(coro: Any, receive: Callable[[], Any]) -> Any:
    """Run `coro` unless the client goes away first; then cancel it (its `finally` aborts)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    return None
