"""OpenAI request bodies (pydantic) and the error body; responses are built as plain dicts.

Every field a client may send is either honoured or refused with a 400 that names it: an
unknown field is an error (a client relying on it would get a plausible, wrong answer), and
known OpenAI fields that the engine does not implement (tools, structured output, penalties,
...) are refused unless they hold their no-op value.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from warmserve.engine.request import SEED_MAX, SEED_MIN

MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 256  # the length of one stop sequence
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_CHOICES = 128  # prompts × n: what one HTTP request may put in the queue
MAX_PROMPT_ITEMS = 1 << 17  # strings or token ids in `prompt` (no context is longer)
MAX_TOP_LOGPROBS = 20

Finite = Annotated[float, Field(allow_inf_nan=False)]


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) holding a lone UTF-16 surrogate, which JSON can
    carry (`"\\ud800"`) but UTF-8 cannot encode; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and find_lone_surrogate(k) is not None:
                return path or "body"
            hit = find_lone_surrogate(v, where)
            if hit is not None:
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            hit = find_lone_surrogate(v, f"{path}[{i}]")
            if hit is not None:
                return hit
    return None


class BodyError(ValueError):
    """A problem with the request body as a whole, naming the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


# Known OpenAI fields the engine does not implement: refused unless they hold the value that
# means "not used" (None, or the listed no-op values).
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "presence_penalty": ((None, 0, 0.0), "presence_penalty is not supported (give 0)"),
    "frequency_penalty": ((None, 0, 0.0), "frequency_penalty is not supported (give 0)"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "store": ((None, False), "storing completions is not supported"),
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Finite, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Finite, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # extension (vLLM): 0 = no limit
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    ignore_eos: bool = False  # extension (vLLM): generate exactly max_tokens
    user: str | None = None  # an end-user id (OpenAI uses it for abuse monitoring): no effect
    # Refused unless unused (see _UNSUPPORTED); declared so they are not "unknown".
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    store: Any = None

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        # Bounds on list sizes first, before any per-element work: validating 90,000 stop
        # strings would hold the event loop for tens of milliseconds only to refuse them.
        if isinstance(data, dict):
            stop = data.get("stop")
            if isinstance(stop, list) and len(stop) > MAX_STOP:
                raise BodyError("stop", f"stop: at most {MAX_STOP} sequences ({len(stop)} given)")
            prompt = data.get("prompt")
            if isinstance(prompt, list) and len(prompt) > MAX_PROMPT_ITEMS:
                raise BodyError("prompt", "prompt: too many items")
        try:  # the common case in one pass at C speed; the walk only names the field
            json.dumps(data, ensure_ascii=False).encode("utf-8")
            return data
        except UnicodeEncodeError:
            pass
        except (TypeError, ValueError):
            return data  # not JSON data: the field validators say what is wrong
        where = find_lone_surrogate(data)
        if where is not None:
            raise BodyError(where, f"{where}: the text holds a lone UTF-16 surrogate, which "
                                   "cannot be encoded as UTF-8")  # fmt: skip
        return data

    @model_validator(mode="after")
    def _supported(self) -> _Request:
        for name, (noop, why) in _UNSUPPORTED.items():
            if name in type(self).model_fields and getattr(self, name) not in noop:
                raise BodyError(name, f"{name}: {why}")
        stops = self.stop_strings()
        if len(stops) > MAX_STOP:
            raise BodyError("stop", f"stop: at most {MAX_STOP} sequences ({len(stops)} given)")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise BodyError("stop", f"stop: a sequence may have at most {MAX_STOP_CHARS} "
                                    "characters")  # fmt: skip
        if self.stream_options is not None and not self.stream:
            raise BodyError("stream_options", "stream_options: only allowed with stream: true")
        return self

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # a participant's name: handed to the model's chat template

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema bodies vary; refused below anyway
    type: str


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # meaningful only with tools, which are refused
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    modalities: list[Literal["text"]] | None = None
    metadata: dict[str, str] | None = None  # stored by OpenAI with `store`: no effect here

    @model_validator(mode="after")
    def _chat_fields(self) -> ChatCompletionRequest:
        if self.response_format is not None and self.response_format.type != "text":
            raise BodyError(
                "response_format",
                f"response_format: {self.response_format.type!r} is not supported (structured "
                "output is not implemented; only 'text')",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise BodyError("top_logprobs", "top_logprobs: needs logprobs: true")
        return self


class CompletionRequest(_Request):
    prompt: Any  # str, [str], [int] or [[int]]: checked by `prompts()` for clear messages
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # the OpenAI default for completions
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: Any = None

    @model_validator(mode="after")
    def _completion_fields(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise BodyError("best_of", "best_of: only best_of == n is supported")
        self.prompts()  # validate the shape now, for a 400 before anything runs
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                out: list[str | list[int]] = list(p)
            elif all(_is_int(x) for x in p):
                out = [list(p)]
            elif all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
                out = [list(x) for x in p]
            else:
                raise BodyError("prompt", "prompt: give a string, a list of strings, a list of "
                                          "token ids, or a list of lists of token ids")  # fmt: skip
            if len(out) > MAX_PROMPTS:
                raise BodyError("prompt", f"prompt: at most {MAX_PROMPTS} prompts per request")
            if len(out) * self.n > MAX_CHOICES:
                raise BodyError("n", f"n: at most {MAX_CHOICES} choices per request (prompts × n)")
            return out
        raise BodyError("prompt", "prompt: give a non-empty string, a list of strings, a list "
                                  "of token ids, or a list of lists of token ids")  # fmt: skip


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error body, for the OpenAPI document."""

    error: ErrorDetail
