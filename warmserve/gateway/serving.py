"""Chat and text completions: validate, tokenize and submit (the bodies sent back are built
in `responses.py`).

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
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

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
        # A participant's `name` goes to the chat template with its message, as vLLM passes it:
        # templates that know names render them.
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in body.messages
        ]
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
