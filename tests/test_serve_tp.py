"""`warmserve serve` with a tensor-parallel model: SmolLM2 at TP 2 over two CPU worker
processes (gloo), next to the same checkpoint at TP 1, through the official openai client.

One server for the module (spawning workers is slow on small machines); the tests run in
order: outputs first, then a worker's death, which replaces the node's workers."""

import os
import signal

import openai
import pytest
from live_server import LiveServer

from warmserve.control.api import Evict, StartInstance

CONTROL = {"capacity_per_instance": 4, "scale_window_s": 1.0, "protect_period_s": 1.0,
           "tick_s": 0.1}  # fmt: skip
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def live(smollm2_dir, tmp_path_factory):
    raw = {
        "workers": {"count": 2, "pool_mib": 1024, "threads": 1},
        "models": [
            {"name": "smol-tp1", "path": str(smollm2_dir), "max_model_len": 512},
            {"name": "smol-tp2", "path": str(smollm2_dir), "max_model_len": 512, "tp": 2},
        ],
        "control": CONTROL,
        "limits": {"shutdown_grace_s": 5},
    }
    with LiveServer(raw, tmp_path_factory.mktemp("tp")) as srv:
        cluster = srv.server.runtime.cluster
        srv.crossing = []  # evictions by a start that cut through a group it does not cover
        apply = cluster.apply

        def checked(actions):  # on the live books, before they change
            group = {g for a in actions if isinstance(a, StartInstance) for g in a.gpus}
            for a in actions:
                if isinstance(a, Evict):
                    devs = set(cluster.replicas[a.replica_id].devices)
                    if devs & group and not (devs <= group or group <= devs):
                        srv.crossing.append((a.replica_id, sorted(devs), sorted(group)))
            return apply(actions)

        cluster.apply = checked
        yield srv


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _greedy(client, model: str, stream: bool = False) -> str:
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
          "extra_body": {"ignore_eos": True}}  # fmt: skip
    if not stream:
        return client.completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))


def test_workers_build_their_tp_groups_once_at_start(live):
    workers = live.admin()["workers"]
    assert len(workers) == 2 and all(w["tp_groups_build_s"] > 0 for w in workers)
    assert live.metric("warmserve:tp_groups_build_seconds", worker="1") > 0


def test_tp2_greedy_output_equals_tp1_streamed_or_not(live, client):
    want = _greedy(client, "smol-tp1")
    assert "Paris" in want
    got = _greedy(client, "smol-tp2")  # waits for the TP 1 instance to scale down
    (inst,) = [i for i in live.admin()["instances"] if i["model"] == "smol-tp2"]
    assert inst["workers"] == [0, 1]
    assert got == want
    assert _greedy(client, "smol-tp2", stream=True) == want
    chat = client.chat.completions.create(
        model="smol-tp2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8, temperature=0)  # fmt: skip
    assert "Paris" in chat.choices[0].message.content
    live.server.runtime.cluster.check()
    assert live.crossing == []


def test_a_dead_follower_fails_its_stream_clearly_and_tp2_comes_back(live, client):
    stream = client.completions.create(model="smol-tp2", prompt="Count:", max_tokens=400,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    it = iter(stream)
    next(it)
    (inst,) = [i for i in live.admin()["instances"] if i["model"] == "smol-tp2"]
    follower = inst["workers"][1]
    restarts = live.metric("warmserve:worker_restarts_total", worker=str(follower))
    os.kill(live.server.runtime.supervisor.workers[follower].pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in it:
            pass
    live.wait_for(lambda: live.metric("warmserve:worker_restarts_total", worker=str(follower))
                  == restarts + 1, 60, "the restart to be counted")  # fmt: skip
    # The leader went too (its node's TP world ended with the follower), and both came back.
    live.wait_for(lambda: all(w["alive"] for w in live.admin()["workers"]), 120, "new workers")
    assert _greedy(client, "smol-tp2") == _greedy(client, "smol-tp1")
    assert live.crossing == []
