"""`warmserve serve` with its universal workers as Ray actors, on a private Ray cluster kept on
loopback: the same runtime and books, only the transport differs."""

import os
import signal
import threading

import openai
import pytest
from live_server import LiveServer

CONTROL = {"capacity_per_instance": 4, "scale_window_s": 1.0, "protect_period_s": 1.0,
           "tick_s": 0.1}  # fmt: skip


@pytest.fixture(scope="module")
def live(tiny_dir, smollm2_dir, tmp_path_factory):
    raw = {
        "workers": {"count": 2, "pool_mib": 640, "threads": 1},
        "models": [
            {"name": "tiny-a", "path": str(tiny_dir)},
            {"name": "tiny-b", "path": str(tiny_dir)},
            {"name": "smollm2", "path": str(smollm2_dir), "max_model_len": 512},
        ],
        "control": CONTROL,
        "runtime": {"kind": "ray"},
        "limits": {"shutdown_grace_s": 5},
    }
    with LiveServer(raw, tmp_path_factory.mktemp("ray")) as srv:
        yield srv
    import ray

    assert not ray.is_initialized()  # the server shut down the cluster it started


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_workers_are_ray_actors_and_serve_every_model(live, client):
    import ray

    view = live.admin()
    assert view["runtime"] == "ray"
    nodes = {w["node"] for w in view["workers"]}
    assert len(nodes) == 1 and ray.get_runtime_context().get_node_id() in nodes
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # loopback only
    pids = {w.pid for w in live.server.runtime.supervisor.workers}
    assert os.getpid() not in pids and len(pids) == 2  # actor processes of their own
    out = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8, temperature=0)  # fmt: skip
    assert "Paris" in out.choices[0].message.content
    for m in ("tiny-a", "tiny-b"):
        stream = client.completions.create(model=m, prompt="hello", max_tokens=5, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        assert [c.choices[0].finish_reason for c in stream][-1] == "length"


def test_a_killed_actor_fails_its_stream_clearly_and_the_model_comes_back(live, client):
    stream = client.completions.create(model="tiny-a", prompt="long", max_tokens=450,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    it = iter(stream)
    next(it)
    next(it)
    (inst,) = [i for i in live.admin()["instances"] if i["model"] == "tiny-a"]
    wid = inst["worker"]
    restarts = live.metric("warmserve:worker_restarts_total", worker=str(wid))
    os.kill(live.server.runtime.supervisor.workers[wid].pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in it:
            pass
    live.wait_for(lambda: live.metric("warmserve:worker_restarts_total", worker=str(wid))
                  == restarts + 1, 30, "the restart to be counted")  # fmt: skip
    live.wait_for(lambda: all(w["alive"] for w in live.admin()["workers"]), 60, "a new actor")
    out = client.completions.create(model="tiny-a", prompt="again", max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_no_accepted_request_is_silently_lost_when_an_actor_dies(live, client):
    """Requests in flight on a killed actor either finish (retried when they had no token
    yet) or end with an explicit error; none hangs, none vanishes."""
    outcomes: list[str] = []

    def one(k: int) -> None:
        try:
            r = client.completions.create(model="tiny-b", prompt=f"item {k}", max_tokens=200,
                                          extra_body={"ignore_eos": True}, timeout=120)  # fmt: skip
            outcomes.append(r.choices[0].finish_reason)
        except openai.APIStatusError as e:
            outcomes.append(f"error {e.status_code}")

    threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    live.wait_for(lambda: any(i["model"] == "tiny-b" and i["requests"] > 0
                              for i in live.admin()["instances"]), 30, "dispatch")  # fmt: skip
    wid = next(i["worker"] for i in live.admin()["instances"] if i["model"] == "tiny-b")
    os.kill(live.server.runtime.supervisor.workers[wid].pid, signal.SIGKILL)
    for t in threads:
        t.join(150)
    assert len(outcomes) == 6, outcomes
    assert all(o == "length" or o == "error 502" for o in outcomes), outcomes
    live.wait_for(lambda: all(w["alive"] for w in live.admin()["workers"]), 60, "a new actor")
    assert client.completions.create(model="tiny-b", prompt="x", max_tokens=2).choices
