"""`warmserve serve` with its universal workers as Ray actors, on a private Ray cluster kept on
loopback: the same runtime and books, only the transport differs."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def _netns_ready() -> str | None:
    """Why two network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    return None


@pytest.mark.skipif(_netns_ready() is not None, reason=str(_netns_ready()))
def test_two_nodes_in_network_namespaces_serve_as_one_cluster(smollm2_dir):
    """Two Ray nodes, each in a network namespace this test makes (joined by a veth pair it
    makes and removes), and the server on the first: workers land on both nodes, TP groups
    never span them, and both models are served."""
    tag = f"{os.getpid() % 10000}"
    ns = [f"wsa{tag}", f"wsb{tag}"]
    veth = [f"wsva{tag}", f"wsvb{tag}"]
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    ips = [f"{net}.1", f"{net}.2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), *sys.path])}  # fmt: skip
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    nodes: list[subprocess.Popen] = []

    def sh(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, timeout=30)

    try:
        for n in ns:
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, ip in zip(ns, veth, ips, strict=True):
            sh("ip", "link", "set", v, "netns", n)
            sh("ip", "-n", n, "addr", "add", f"{ip}/24", "dev", v)
            sh("ip", "-n", n, "link", "set", v, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        head = ["--head", "--port=6379", "--include-dashboard=false"]
        join = [f"--address={ips[0]}:6379"]
        for n, ip, extra in ((ns[0], ips[0], head), (ns[1], ips[1], join)):
            nodes.append(subprocess.Popen(
                ["ip", "netns", "exec", n, ray_bin, "start", "--block", f"--node-ip-address={ip}",
                 "--num-cpus=2", "--disable-usage-stats", *extra],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))  # fmt: skip
            time.sleep(8 if extra is head else 0)
        run = subprocess.run(
            ["ip", "netns", "exec", ns[0], sys.executable, str(Path(__file__).parent /
             "netns_cluster.py"), f"{ips[0]}:6379", str(smollm2_dir)],
            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        seen = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        for p in nodes:  # each `ray start --block` and the node processes it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for n in ns:
            pids = subprocess.run(["ip", "netns", "pids", n], capture_output=True,
                                  text=True).stdout.split()  # fmt: skip
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
    assert {w[1] for w in seen["workers"]} and len({w[1] for w in seen["workers"]}) == 2
    assert all(w[2] for w in seen["workers"])
    assert all("Paris" in text for text in seen["outs"].values()), seen["outs"]
    assert sorted(m for m, _ in seen["instances"]) == ["a", "b"]
