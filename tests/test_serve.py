"""`warmserve serve` end to end: the real runtime, worker processes and HTTP, through the
official `openai` client (and raw HTTP where a client would refuse to send the input)."""

import json
import os
import signal
import threading

import httpx
import openai
import pytest
import uvicorn
from live_server import LiveServer, free_port

from warmserve.gateway.app import build_app

# The default policy (warmserve-plus) keeps idle instances keep_alive_s: short here, so that
# scale-down (weights stay as a prewarmed replica) happens within a test.
CONTROL = {"capacity_per_instance": 4, "scale_window_s": 1.0, "protect_period_s": 1.0,
           "tick_s": 0.1, "keep_alive_s": 1.0}  # fmt: skip


def config(tiny_dir, smollm2_dir, **extra):
    return {
        "workers": {"count": 2, "pool_mib": 640, "threads": 1},
        "models": [
            {"name": "tiny-a", "path": str(tiny_dir)},
            {"name": "tiny-b", "path": str(tiny_dir)},
            {"name": "tiny-c", "path": str(tiny_dir)},
            {"name": "smollm2", "path": str(smollm2_dir), "max_model_len": 1024},
        ],
        "control": CONTROL,
        "limits": {"max_request_bytes": 65536, "shutdown_grace_s": 5},
        **extra,
    }


@pytest.fixture(scope="module")
def live(tiny_dir, smollm2_dir, tmp_path_factory):
    with LiveServer(config(tiny_dir, smollm2_dir), tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_every_model_with_its_state(live, client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-a", "tiny-b", "tiny-c", "smollm2"}
    states = live.states()
    assert set(states.values()) <= {"serving", "starting", "prewarmed", "loading", "cold"}
    assert live.get("/health").json() == {"status": "ok"}


def test_smollm2_chat_streaming_equals_non_streaming(live, client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12,
                                          temperature=0)  # fmt: skip
    text = full.choices[0].message.content
    assert "Paris" in text
    assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens > 10
    assert full.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12,
                                            temperature=0, stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_completions_stream_usage_length_and_stop(client):
    stream = client.completions.create(model="tiny-a", prompt="hello there", max_tokens=7,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert text
    # A stop string cut out of the same greedy text: the output ends right before it.
    words = text.split()
    stop = words[len(words) // 2] if len(words) > 1 else text[2:4]
    out = client.completions.create(
        model="tiny-a",
        prompt="hello there",
        max_tokens=7,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_seeded_sampling_repeats(client):
    kw = {"model": "tiny-b", "prompt": "a b c", "max_tokens": 8, "temperature": 1.0,
          "top_p": 0.9, "seed": 1234, "extra_body": {"ignore_eos": True}}  # fmt: skip
    assert client.completions.create(**kw).choices[0].text == (
        client.completions.create(**kw).choices[0].text
    )


def test_concurrent_requests_across_models(client):
    results, errors = {}, []

    def one(k: int) -> None:
        model = ("tiny-a", "tiny-b", "tiny-c")[k % 3]
        try:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"hi {k}"}], max_tokens=6,
                temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
            results[k] = (model, r.usage.completion_tokens)
        except Exception as e:  # collected: the assertion below reports it
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert sorted(results) == list(range(9)) and all(n == 6 for _, n in results.values())


def test_burst_activates_a_prewarmed_replica(live, client):
    client.completions.create(model="tiny-c", prompt="warm up", max_tokens=2)
    # Scale-down keeps the weights: the model is prewarmed once its instance stops.
    live.wait_for(lambda: live.states()["tiny-c"] == "prewarmed", 30, "tiny-c prewarmed")
    hits = live.metric("warmserve:instance_starts_total", model_name="tiny-c", path="prewarm_hit")
    done = []
    threads = [threading.Thread(target=lambda: done.append(client.completions.create(
        model="tiny-c", prompt="burst", max_tokens=4).choices[0].finish_reason))
        for _ in range(6)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(done) == 6
    after = live.metric("warmserve:instance_starts_total", model_name="tiny-c", path="prewarm_hit")
    assert after >= hits + 1
    assert live.metric("warmserve:activation_seconds_count", model_name="tiny-c") >= 1


def test_bad_input_gets_openai_errors_and_serving_goes_on(live, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-a", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-a", prompt="x", max_tokens=10_000)  # > context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-a", prompt="word " * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-a", prompt="x", n=17)  # at most 16 choices
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-a", prompt="x", temperature=-1)
    raw = [
        (b"{not json", 400),
        (json.dumps({"model": "tiny-a", "prompt": "x", "max_tokens": "many"}).encode(), 400),
        (json.dumps({"model": "tiny-a", "messages": "hello"}).encode(), 400),
        (json.dumps({"prompt": "x"}).encode(), 400),
        (json.dumps({"model": "tiny-a", "prompt": [10**9]}).encode(), 400),
        (json.dumps({"model": "tiny-a", "prompt": "x" * 70_000}).encode(), 413),
    ]
    for body, status in raw:
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = live.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:60], r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
    r = live.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    ok = client.completions.create(model="tiny-a", prompt="still there?", max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_client_disconnect_aborts_and_frees_kv(live):
    body = {"model": "tiny-b", "prompt": "go on", "max_tokens": 400, "stream": True,
            "ignore_eos": True}  # fmt: skip
    done_before = live.metric("warmserve:request_success_total", model_name="tiny-b",
                              finished_reason="length")  # fmt: skip
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        inst = [i for i in live.admin()["instances"] if i["model"] == "tiny-b"]
        assert inst and inst[0]["requests"] == 1

    # The connection is closed mid-stream: the request ends and its KV blocks are freed.
    def freed() -> bool:
        insts = [i for i in live.admin()["instances"] if i["model"] == "tiny-b"]
        return all(i["requests"] == 0 and i["kv_used_blocks"] == 0 for i in insts)

    live.wait_for(freed, 20, "the aborted request's KV to be freed")
    # It was aborted, not run to its 400 tokens: no success is counted for it.
    assert live.metric("warmserve:request_success_total", model_name="tiny-b",
                       finished_reason="length") == done_before  # fmt: skip


def test_killed_worker_fails_streaming_request_and_model_comes_back(live, client):
    stream = client.completions.create(model="tiny-a", prompt="long", max_tokens=450,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    it = iter(stream)
    next(it)
    next(it)
    (inst,) = [i for i in live.admin()["instances"] if i["model"] == "tiny-a"]
    wid = inst["worker"]
    pid = live.server.runtime.supervisor.workers[wid].process.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in it:
            pass
    live.wait_for(lambda: live.metric("warmserve:worker_restarts_total", worker=str(wid)) >= 1,
                  20, "the restart to be counted")  # fmt: skip
    out = client.completions.create(model="tiny-a", prompt="again", max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")
    live.wait_for(lambda: all(w["alive"] for w in live.admin()["workers"]), 60,
                  "the worker to come back")  # fmt: skip
    assert live.metric("warmserve:worker_up", worker=str(wid)) == 1


def test_metrics_expose_latency_queue_and_pool(live, client):
    client.completions.create(model="tiny-a", prompt="metrics", max_tokens=3)
    text = live.get("/metrics").text
    for name in ("warmserve:time_to_first_token_seconds_bucket",
                 "warmserve:time_per_output_token_seconds_bucket",
                 "warmserve:num_requests_waiting", "warmserve:num_instances",
                 "warmserve:instance_starts_total", "warmserve:pool_pages",
                 "warmserve:generation_tokens_total"):  # fmt: skip
        assert name in text, name
    assert live.metric("warmserve:time_to_first_token_seconds_count", model_name="tiny-a") >= 1
    total = sum(live.metric("warmserve:pool_pages", worker="0", use=u)
                for u in ("free", "weights", "kv"))  # fmt: skip
    assert total == 320  # 640 MiB of 2 MiB pages, every page in exactly one use
    view = live.admin()
    assert {"workers", "instances", "replicas", "models"} <= set(view)
    assert set(view["models"]["tiny-a"]) >= {"state", "load", "forecast_avg", "forecast_peak"}


def test_api_keys_guard_the_api_and_admin(live):
    app = build_app(live.server.serving, live.server.runtime.metrics_text, ["s3cret"], 65536)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                       lifespan="off"))  # fmt: skip
    t = threading.Thread(target=uv.run, daemon=True)
    t.start()
    try:
        live.wait_for(lambda: uv.started, 20, "the keyed app")
        base = f"http://127.0.0.1:{port}"
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny-a", prompt="k", max_tokens=2).choices
        assert httpx.get(base + "/admin/cluster").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(base + "/admin/cluster", headers=auth).status_code == 200
        assert httpx.get(base + "/health").status_code == 200
    finally:
        uv.should_exit = True
        t.join(30)


def test_bench_replays_a_scaled_trace(live, tmp_path):
    from warmserve.bench import BenchConfig, run_bench

    cfg = BenchConfig(endpoint=live.url, trace="azure-conv", models=("tiny-a", "tiny-b"),
                      rps=1.0, time_scale=4.0, duration_s=40.0, max_input_tokens=64,
                      max_output_tokens=8, max_requests=40)  # fmt: skip
    summary = run_bench(cfg, tmp_path, quiet=True)
    assert summary["arrived"] >= 5 and summary["completed"] == summary["arrived"]
    assert summary["ttft_p99_s"] is not None and summary["tpot_mean_s"] is not None
    doc = json.loads((tmp_path / "summary.json").read_text())
    s = doc["policies"]["endpoint"]
    for key in ("arrived", "completed", "failed", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s",
                "throughput_rps", "slo_attainment", "per_model"):  # fmt: skip
        assert key in s
    assert set(s["per_model"]) == {"tiny-a", "tiny-b"}
    assert (tmp_path / "ttft_cdf.png").stat().st_size > 0
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert len(rows) == summary["arrived"] + 1 and rows[0].startswith("arrival_s,model")


def test_worker_death_before_any_token_retries_elsewhere(live, client):
    """A request whose worker dies before its first token runs again, invisibly."""
    result = {}

    def call() -> None:
        try:
            r = client.completions.create(model="smollm2", prompt="tell me " * 450, max_tokens=3)
            result["ok"] = r.choices[0].finish_reason
        except Exception as e:  # reported by the assertion below
            result["err"] = repr(e)

    t = threading.Thread(target=call)
    t.start()

    def dispatched():
        insts = [i for i in live.admin()["instances"] if i["model"] == "smollm2"]
        return [i for i in insts if i["requests"] == 1]

    live.wait_for(lambda: bool(dispatched()), 30, "the long prompt to be dispatched")
    wid = dispatched()[0]["worker"]
    os.kill(live.server.runtime.supervisor.workers[wid].process.pid, signal.SIGKILL)
    t.join(180)
    assert result.get("ok") in ("stop", "length"), result
    assert live.metric("warmserve:request_failure_total", model_name="smollm2",
                       reason="worker_died") == 0  # fmt: skip


def test_idle_kv_pages_are_lent_to_prewarm_a_forecast_model(tiny_dir, smollm2_dir, tmp_path):
    """One worker serves SmolLM2; the forecast says tiny-b is busy all day. The instance lends
    the KV pages it does not need, and tiny-b is prewarmed into them while SmolLM2 serves."""
    rows = ["timestamp_s,model,input_tokens,output_tokens"]
    rows += [f"{t},tiny-b,16,100" for t in range(0, 86_400, 10)]
    (tmp_path / "history.csv").write_text("\n".join(rows) + "\n")
    raw = {
        "workers": {"count": 1, "pool_mib": 640, "threads": 1},
        "models": [
            {"name": "smollm2", "path": str(smollm2_dir), "max_model_len": 512},
            {"name": "tiny-b", "path": str(tiny_dir)},
        ],
        "control": {**CONTROL, "scale_window_s": 30.0, "protect_period_s": 30.0},
        "forecast": {"history": "history.csv"},
    }
    with LiveServer(raw, tmp_path) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        out = client.completions.create(model="smollm2", prompt="The capital of France is",
                                        max_tokens=4, temperature=0)  # fmt: skip
        assert out.choices[0].text

        def lent_and_prewarmed() -> bool:
            view = srv.admin()
            inst = [i for i in view["instances"] if i["model"] == "smollm2"]
            reps = [r for r in view["replicas"] if r["model"] == "tiny-b" and r["ready"]]
            return bool(inst and inst[0]["kv_lent_pages"] > 0 and reps)

        srv.wait_for(lent_and_prewarmed, 30, "KV pages lent and tiny-b prewarmed in them")
        assert srv.metric("warmserve:kv_lent_pages", worker="0") > 0
        # The shrunken instance still serves, and gives the same greedy answer.
        again = client.completions.create(model="smollm2", prompt="The capital of France is",
                                          max_tokens=4, temperature=0)  # fmt: skip
        assert again.choices[0].text == out.choices[0].text


def test_vanilla_autoscaling_starts_a_new_engine_per_instance(tiny_dir, tmp_path):
    raw = {
        "workers": {"count": 1, "pool_mib": 64, "threads": 1},
        "models": [{"name": "tiny", "path": str(tiny_dir)}],
        "policy": "vanilla-autoscale",
        # vanilla-autoscale has no keep-alive: the setting would be refused.
        "control": {k: v for k, v in CONTROL.items() if k != "keep_alive_s"},
    }
    with LiveServer(raw, tmp_path) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        runtime = srv.server.runtime
        first = runtime.supervisor.workers[0].process.pid
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices
        # Scale-down stops the instance's engine process: nothing stays resident.
        srv.wait_for(lambda: srv.states()["tiny"] == "cold", 30, "scale-down")
        srv.wait_for(
            lambda: not runtime.supervisor.workers[0].process.is_alive(), 30, "engine exit"
        )
        out = client.completions.create(model="tiny", prompt="b", max_tokens=2)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert runtime.supervisor.workers[0].process.pid != first  # a fresh engine served it
        assert srv.metric("warmserve:instance_starts_total", model_name="tiny", path="cold") == 2
        assert srv.metric("warmserve:worker_restarts_total", worker="0") == 0  # not a failure
        runtime.cluster.check()


def test_a_request_that_cannot_get_an_instance_times_out_with_503(tiny_dir, smollm2_dir, tmp_path):
    raw = {
        "workers": {"count": 1, "pool_mib": 640, "threads": 1},
        "models": [
            {"name": "smollm2", "path": str(smollm2_dir), "max_model_len": 512},
            {"name": "tiny", "path": str(tiny_dir)},
        ],
        "control": CONTROL,
        "limits": {"queue_timeout_s": 1.0},
    }
    with LiveServer(raw, tmp_path) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        # The only worker serves a long SmolLM2 stream, so tiny cannot start.
        stream = client.completions.create(
            model="smollm2",
            prompt="count",
            max_tokens=200,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        it = iter(stream)
        next(it)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and "became available" in str(e.value)
        assert next(it).choices[0].text is not None  # the stream goes on
        stream.close()
        assert srv.metric("warmserve:request_failure_total", model_name="tiny",
                          reason="queue_timeout") == 1  # fmt: skip


def test_a_request_on_two_workers_that_die_is_failed_not_retried_again(smollm2_dir, tmp_path):
    """Poison-pill rule: a request is retried once after a worker death, never a third time.
    A server of its own, so that each dispatch waits for a cold start (a wide window)."""
    raw = {
        "workers": {"count": 2, "pool_mib": 640, "threads": 1},
        "models": [{"name": "smollm2", "path": str(smollm2_dir), "max_model_len": 1024}],
        "control": CONTROL,
    }
    result = {}
    with LiveServer(raw, tmp_path) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0,
                               timeout=120)  # fmt: skip

        def call() -> None:
            try:
                client.completions.create(model="smollm2", prompt="explain " * 450, max_tokens=3)
                result["ok"] = True
            except openai.APIStatusError as e:
                result["status"], result["body"] = e.status_code, e.body

        def holding(killed):
            """(instance, worker) holding the request, other than instances already killed."""
            insts = [i for i in live.admin()["instances"] if i["model"] == "smollm2"]
            return [(i["instance"], i["worker"]) for i in insts
                    if i["requests"] == 1 and i["instance"] not in killed]  # fmt: skip

        t = threading.Thread(target=call)
        t.start()
        killed: set[int] = set()
        for _ in range(2):
            live.wait_for(lambda: bool(holding(killed)) or bool(result), 60, "a dispatch")
            assert not result, result
            inst, wid = holding(killed)[0]
            os.kill(live.server.runtime.supervisor.workers[wid].process.pid, signal.SIGKILL)
            killed.add(inst)
        t.join(180)
        assert result.get("status") == 502 and "two workers died" in result["body"]["message"]
        assert live.metric("warmserve:request_failure_total", model_name="smollm2",
                           reason="worker_died_twice") == 1  # fmt: skip
        live.wait_for(lambda: all(w["alive"] for w in live.admin()["workers"]), 60, "restarts")
        out = client.completions.create(model="smollm2", prompt="still here", max_tokens=2)
        assert out.choices[0].finish_reason in ("stop", "length")
