"""`warmserve serve` against hostile but fair clients: one bad request never hurts another.

Each test here is a regression test for a defect found by fuzzing and load: requests that
killed workers, inputs that got a plain-text 500, ghost requests, silently ignored fields,
bodies and clients that broke the documented limits, and a shutdown that cut streams."""

import asyncio
import json
import math
import os
import socket
import threading
import time

import httpx
import openai
import pytest
from live_server import LiveServer

CONTROL = {"capacity_per_instance": 32, "scale_window_s": 1.0, "protect_period_s": 1.0,
           "tick_s": 0.1}  # fmt: skip
LIMITS = {"max_request_bytes": 2 << 20, "shutdown_grace_s": 5, "default_max_tokens": 8,
          "header_timeout_s": 1.0, "body_timeout_s": 1.0}  # fmt: skip


@pytest.fixture(scope="module")
def live(tiny_dir, tmp_path_factory):
    raw = {
        "workers": {"count": 2, "pool_mib": 128, "threads": 1},
        "models": [
            {"name": "tiny-a", "path": str(tiny_dir)},
            {"name": "tiny-b", "path": str(tiny_dir)},
        ],
        "control": CONTROL,
        "limits": LIMITS,
    }
    with LiveServer(raw, tmp_path_factory.mktemp("hard")) as srv:
        yield srv


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(live, path, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(live.url + path, content=data, timeout=60,
                      headers={"content-type": "application/json"}, **kw)  # fmt: skip


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_tiny_temperature_or_top_p_is_served_while_20_streams_on_its_worker_finish(live):
    """Used to raise in torch.multinomial, kill the worker, and kill the next one on retry."""
    results, errors = [], []
    started = threading.Barrier(21)

    def stream() -> None:
        body = {"model": "tiny-a", "prompt": "count with me", "max_tokens": 400, "stream": True,
                "ignore_eos": True, "temperature": 0}  # fmt: skip
        try:
            with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=120) as r:
                lines = r.iter_lines()
                first = next(lines)
                started.wait(60)
                rest = [x for x in (first, *lines) if x]
            chunks = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
            assert rest[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
            results.append(chunks[-1]["choices"][0]["finish_reason"])
        except Exception as e:  # reported by the assertion below
            errors.append(repr(e))
            started.abort()

    threads = [threading.Thread(target=stream) for _ in range(20)]
    for t in threads:
        t.start()
    started.wait(60)
    (inst,) = [i for i in live.admin()["instances"] if i["model"] == "tiny-a"]
    assert inst["requests"] >= 15  # the streams share the instance the bad requests go to
    poison = [{"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 1e-50},
              {"top_p": 5e-324, "temperature": 1.5}, {"top_p": 1e-300, "top_k": 2}]  # fmt: skip
    for extra in poison:
        r = post(live, "/v1/completions", {"model": "tiny-a", "prompt": "hi", "max_tokens": 2,
                                           **extra})  # fmt: skip
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    for t in threads:
        t.join(120)
    assert errors == [] and results == ["length"] * 20, errors[:2]
    assert live.metric("warmserve:worker_restarts_total", worker=str(inst["worker"])) == 0
    assert live.metric("warmserve:request_failure_total", model_name="tiny-a",
                       reason="engine_error") == 0  # fmt: skip


def test_lone_surrogates_get_400_and_the_connection_lives_on(live):
    bodies = [
        b'{"model": "tiny-a", "prompt": "\\ud800"}',
        b'{"model": "tiny-a", "prompt": ["ok", "\\udfff tail"]}',
        b'{"model": "tiny-\\ud800", "prompt": "x"}',
        b'{"model": "tiny-a", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        b'{"model": "tiny-a", "prompt": "x", "\\ud800": 1}',
        b'{"model": "tiny-a", "prompt": "x", "stop": ["\\udc00"]}',
    ]
    with httpx.Client(base_url=live.url, timeout=60) as http:  # one keep-alive connection
        for body in bodies:
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            err = assert_error(r, 400)
            assert "surrogate" in err["message"] or "Unrecognized" in err["message"]
        ok = http.post("/v1/completions", json={"model": "tiny-a", "prompt": "fine",
                                                 "max_tokens": 2})  # fmt: skip
        assert ok.status_code == 200


def test_seed_outside_int64_is_refused_and_leaves_no_ghost(live):
    for seed in (2**63, 2**64 + 5, -(2**63) - 1):
        r = post(live, "/v1/completions", {"model": "tiny-b", "prompt": "x", "seed": seed,
                                           "max_tokens": 200, "ignore_eos": True})  # fmt: skip
        err = assert_error(r, 400, "seed")
        assert "Overflow" not in err["message"] and "long long" not in err["message"]
    ok = post(live, "/v1/completions", {"model": "tiny-b", "prompt": "x", "seed": 2**63 - 1,
                                        "max_tokens": 2, "temperature": 1})  # fmt: skip
    assert ok.status_code == 200
    # Nothing keeps running for the refused requests.
    live.wait_for(lambda: all(i["requests"] == 0 for i in live.admin()["instances"]), 10,
                  "no request in flight")  # fmt: skip


def test_huge_prompts_and_many_stop_strings_are_refused_before_tokenising(live):
    r = post(live, "/v1/completions", {"model": "tiny-a", "prompt": "a " * 500_000})
    err = assert_error(r, 400, "prompt")
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
    r = post(
        live,
        "/v1/chat/completions",
        {"model": "tiny-a", "messages": [{"role": "user", "content": "b" * 1_000_000}]},
    )
    assert assert_error(r, 400, "messages")["code"] == "context_length_exceeded"
    r = post(live, "/v1/completions", {"model": "tiny-a", "prompt": "x",
                                       "stop": [f"s{k}" for k in range(90_000)]})  # fmt: skip
    assert "at most 4" in assert_error(r, 400, "stop")["message"]
    r = post(live, "/v1/completions", {"model": "tiny-a", "prompt": "x", "stop": "z" * 300})
    assert_error(r, 400, "stop")


def test_unknown_and_unsupported_fields_are_refused_by_name(live):
    chat = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (
            "/v1/chat/completions",
            {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
        ),
        ("/v1/chat/completions", {**chat, "tool_choice": "auto"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {**chat, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {**chat, "response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format",
        ),
        ("/v1/chat/completions", {**chat, "frobnicate": True}, "frobnicate"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"5": 10}}, "logit_bias"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"model": "tiny-a", "prompt": "x", "suffix": "y"}, "suffix"),
        (
            "/v1/completions",
            {"model": "tiny-a", "prompt": "x", "presence_penalty": 1},
            "presence_penalty",
        ),
        ("/v1/completions", {"model": "tiny-a", "prompt": [[1, 2], "x"]}, "prompt"),
        (
            "/v1/completions",
            {"model": "tiny-a", "prompt": "x", "temperature": math.nan},
            "temperature",
        ),
    ]
    for path, body, param in cases:
        err = assert_error(post(live, path, body), 400, param)
        assert "Input should be a valid string" not in err["message"]
    nan = post(live, "/v1/completions", {"model": "tiny-a", "prompt": "x", "temperature": math.nan})
    assert "finite" in nan.json()["error"]["message"]
    # The no-op values of those fields are accepted.
    ok = post(live, "/v1/chat/completions", {**chat, "max_tokens": 2, "tool_choice": "none",
                                             "response_format": {"type": "text"},
                                             "presence_penalty": 0, "user": "u1"})  # fmt: skip
    assert ok.status_code == 200, ok.text


def test_n_batches_logprobs_and_echo_are_honoured(live, client):
    out = client.completions.create(
        model="tiny-a",
        prompt=["one", "two"],
        n=2,
        max_tokens=3,
        temperature=1.0,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12
    ids = client.completions.create(
        model="tiny-a",
        prompt=[[5, 6, 7], [8, 9]],
        max_tokens=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    lp = client.completions.create(
        model="tiny-a",
        prompt="hello",
        max_tokens=4,
        logprobs=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    c = lp.choices[0].logprobs
    assert len(c.tokens) == len(c.token_logprobs) == 4 and all(v <= 0 for v in c.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in c.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(math.isclose(v, max(t.values()), abs_tol=1e-5)
               for v, t in zip(c.token_logprobs, c.top_logprobs, strict=True))  # fmt: skip
    assert "".join(c.tokens) == lp.choices[0].text
    chat = client.chat.completions.create(
        model="tiny-b",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        n=2,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert len(chat.choices) == 2
    for ch in chat.choices:
        content = ch.logprobs.content
        assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
        assert all(e.bytes is not None for e in content)
    echo = client.completions.create(model="tiny-a", prompt="say it", max_tokens=2, echo=True)
    assert echo.choices[0].text.startswith("say it")
    # What evaluation harnesses send for a log-likelihood: echo, logprobs, one token.
    ll = client.completions.create(model="tiny-a", prompt="the cat sat", max_tokens=1,
                                   echo=True, logprobs=1, temperature=0)  # fmt: skip
    lp = ll.choices[0].logprobs
    n_prompt = ll.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]).strip() == "the cat sat"
    assert ll.choices[0].text.startswith("the cat sat")
    stream = client.completions.create(
        model="tiny-a",
        prompt="the cat sat",
        max_tokens=1,
        echo=True,
        logprobs=1,
        temperature=0,
        stream=True,
    )
    streamed = [t for ch in stream if ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.token_logprobs]  # fmt: skip
    assert streamed[0] is None
    assert streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    # Streaming with n = 2: chunks of both choices, each ending once.
    stream = client.completions.create(
        model="tiny-a", prompt="s", n=2, max_tokens=3, stream=True, extra_body={"ignore_eos": True}
    )
    ends = [ch.choices[0].index for ch in stream if ch.choices[0].finish_reason]
    assert sorted(ends) == [0, 1]


def test_chunked_body_over_the_limit_gets_413(live):
    def chunks():
        for _ in range(40):
            yield b"x" * (64 << 10)  # 2.5 MiB in all, no content-length

    r = httpx.post(live.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert_error(r, 413)


def test_slow_clients_are_timed_out(live):
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # sends nothing
        time.sleep(1.6)
        s.settimeout(5)
        assert s.recv(100) == b""  # closed by the server
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json"
                  b"\r\ncontent-length: 100\r\n\r\n{\"model\"")  # fmt: skip
        s.settimeout(10)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 408"), head[:100]


def test_openapi_document_tells_the_truth(live):
    doc = live.get("/openapi.json").json()
    post_ = doc["paths"]["/v1/completions"]["post"]["responses"]
    for code in ("400", "404", "413", "429", "502", "503"):
        ref = post_[code]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert "422" not in post_ and "text/event-stream" in post_["200"]["content"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    r = httpx.post(live.url + "/health", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json()["error"]["message"]


def test_client_aborts_are_counted(live):
    before = live.metric("warmserve:request_aborted_total", model_name="tiny-b")
    body = {"model": "tiny-b", "prompt": "go", "max_tokens": 400, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
    live.wait_for(lambda: live.metric("warmserve:request_aborted_total", model_name="tiny-b")
                  == before + 1, 10, "the abort to be counted")  # fmt: skip


def test_a_dead_worker_is_reaped_at_once_and_restarted_after_half_a_second(live, client):
    client.completions.create(model="tiny-b", prompt="warm", max_tokens=2)
    runtime = live.server.runtime
    wid = next(i["worker"] for i in live.admin()["instances"] if i["model"] == "tiny-b")
    proc = runtime.supervisor.workers[wid].process
    restarts = live.metric("warmserve:worker_restarts_total", worker=str(wid))
    os.kill(proc.pid, 9)
    live.wait_for(lambda: runtime.supervisor.respawns[wid] is not None
                  and live.metric("warmserve:worker_restarts_total", worker=str(wid))
                  == restarts + 1, 10, "the death to be handled")  # fmt: skip
    handle = runtime.supervisor.respawns[wid]
    loop = runtime.supervisor.loop
    delay = handle.when() - loop.time()
    assert 0 < delay <= 0.5  # the first restart waits 0.5 s (it waited 1 s, then 4, 16)
    assert proc.exitcode is not None  # reaped, not a zombie until the next spawn
    live.wait_for(lambda: all(w["alive"] for w in live.admin()["workers"]), 30, "restart")


def test_restart_back_off_doubles_from_half_a_second():
    from warmserve.runtime.supervisor import restart_delay

    assert [restart_delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_shutdown_past_the_grace_period_fails_streams_and_queued_requests_cleanly(
    tiny_dir, tmp_path
):
    raw = {
        "workers": {"count": 1, "pool_mib": 128, "threads": 1},
        "models": [
            {"name": "long", "path": str(tiny_dir)},
            {"name": "waits", "path": str(tiny_dir)},
        ],
        "control": {**CONTROL, "protect_period_s": 60.0, "scale_window_s": 60.0},
        "limits": {**LIMITS, "shutdown_grace_s": 0.5},
    }
    srv = LiveServer(raw, tmp_path)
    srv.__enter__()
    lines: list[str] = []
    queued: dict[str, httpx.Response] = {}
    try:
        body = {"model": "long", "prompt": "go", "max_tokens": 480, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            lines += [next(it), next(it)]

            def wait_queued() -> None:
                queued["r"] = post(srv, "/v1/completions", {"model": "waits", "prompt": "x"})

            t = threading.Thread(target=wait_queued)
            t.start()
            srv.wait_for(
                lambda: srv.metric("warmserve:num_requests_waiting", model_name="waits") == 1,
                10,
                "a queued request",
            )
            stopper = threading.Thread(target=srv.__exit__, args=(None, None, None))
            stopper.start()
            lines += list(it)
            t.join(30)
    finally:
        stopper.join(60)
    data = [x for x in lines if x.startswith("data: ")]  # SSE events, blank lines apart
    assert data[-1] == "data: [DONE]"
    last = json.loads(data[-2][6:])
    assert last["error"]["type"] == "server_error" and "shutting down" in last["error"]["message"]
    err = assert_error(queued["r"], 503)
    assert "shutting down" in err["message"]
    assert not stopper.is_alive()


def test_fuzzed_bodies_get_documented_answers_and_the_server_serves_on(live):
    """A bounded property-based fuzz of both POST endpoints: no 5xx but the documented
    502/503, an OpenAI error body on every 4xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text = st.text(max_size=20) | st.sampled_from(["\ud800", "", "hi", "\x00", "é" * 3])
    scalar = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
              | st.floats(allow_nan=True, allow_infinity=True) | text)  # fmt: skip
    value = st.recursive(scalar, lambda c: st.lists(c, max_size=4)
                         | st.dictionaries(text, c, max_size=3), max_leaves=8)  # fmt: skip
    small = st.integers(-2, 6) | st.none() | scalar
    tiny = st.sampled_from([1e-300, 5e-324, 1e-50, 1e-38, -0.0])  # where maths used to break
    common = {
        "model": st.sampled_from(["tiny-a", "tiny-b", "nope"]) | text,
        "max_tokens": small, "temperature": tiny | st.floats(-1, 3) | scalar,
        "top_p": tiny | st.floats(-0.5, 1.5) | scalar, "top_k": small,
        "n": st.integers(0, 3) | scalar,
        "stream": st.booleans() | scalar, "stop": st.lists(text, max_size=6) | scalar,
        "seed": st.integers(-(2**65), 2**65) | scalar, "ignore_eos": st.booleans(),
        "logprobs": st.booleans() | small, "top_logprobs": small, "echo": st.booleans(),
        "response_format": value, "tools": value, "stream_options": value, "user": value,
        "frobnicate": value,
    }  # fmt: skip
    prompt = (
        text
        | st.lists(text, max_size=3)
        | st.lists(st.integers(-5, 60000), max_size=5)
        | st.lists(st.lists(st.integers(0, 100), max_size=3), max_size=2)
        | value
    )
    messages = st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot"]), "content": text | value}
    ), max_size=3) | value  # fmt: skip

    def body(base: dict, extra: dict) -> st.SearchStrategy:
        """A valid request with up to three fields replaced or added, or any JSON at all."""
        keys = {**common, **extra}

        @st.composite
        def mutated(draw):
            b = dict(base)
            # The prompt (or messages) and the sampling fields are picked more often.
            hot = [*extra, "temperature", "top_p", "model"]
            picks = st.sampled_from(sorted(keys)) | st.sampled_from(hot)
            for k in draw(st.lists(picks, max_size=3, unique=True)):
                b[k] = draw(keys[k])
            return b

        return mutated() | value

    counts = {"2xx": 0, "4xx": 0, "5xx": 0}

    @settings(max_examples=250, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.data())
    def case(path, data):
        if path == "/v1/completions":
            b = data.draw(body({"model": "tiny-a", "prompt": "hi", "max_tokens": 2},
                               {"prompt": prompt}))  # fmt: skip
        else:
            chat = {"model": "tiny-b", "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
            b = data.draw(body(chat, {"messages": messages}))
        raw = json.dumps(b).encode()  # NaN/Infinity go out as JSON's common extension
        r = post(live, path, raw)
        s = r.status_code
        counts[f"{s // 100}xx"] = counts.get(f"{s // 100}xx", 0) + 1
        assert s < 500 or s in (502, 503), (s, raw[:200], r.text[:300])
        if 400 <= s < 500:
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and err["type"]
        elif s == 200 and "text/event-stream" in r.headers.get("content-type", ""):
            assert r.text.rstrip().endswith("data: [DONE]")

    case()
    print(f"fuzz: {sum(counts.values())} cases, {counts}")
    assert counts["2xx"] > 0 and counts["4xx"] > 0 and counts["5xx"] == 0
    ok = post(live, "/v1/completions", {"model": "tiny-a", "prompt": "after", "max_tokens": 2})
    assert ok.status_code == 200
    assert asyncio.run(_health(live.url)) == 200


async def _health(url: str) -> int:
    async with httpx.AsyncClient() as c:
        return (await c.get(url + "/health", timeout=10)).status_code
