"""Ray across two nodes: two network namespaces joined by a veth pair (made and removed by
the test; CI runs as root), one Ray node in each, and the server in the first. A module of its
own, so no other Ray cluster of the test process is up meanwhile."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


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
    makes and removes), and the server on the first: workers land on both nodes, each
    reporting its own node, and both models are served."""
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
            time.sleep(3 if extra is head else 0)  # the script waits for both nodes
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
