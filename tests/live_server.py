"""A real `warmserve serve` stack (runtime, worker processes, FastAPI app, uvicorn) on a
loopback port, run in a thread of the test process, plus helpers to inspect it over HTTP."""

from __future__ import annotations

import random
import socket
import time
from typing import Any

import httpx

from warmserve.serve_config import parse_serve_config
from warmserve.server import BackgroundServer


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port the kernel picked
    (bind to 0) and we released could be handed to the server's workers' own sockets (gloo's,
    for TP groups) before the server binds it; those never take a port below the range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


class LiveServer(BackgroundServer):
    def __init__(self, raw_config: dict[str, Any], base_dir) -> None:
        cfg = parse_serve_config({**raw_config, "listen": {"port": free_port()}}, base_dir)
        super().__init__(cfg)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def admin(self) -> dict[str, Any]:
        return self.get("/admin/cluster").json()

    def states(self) -> dict[str, str]:
        return {m["id"]: m["state"] for m in self.get("/v1/models").json()["data"]}

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0 if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as rendered
        for line in self.get("/metrics").text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            key, _, value = line.rpartition(" ")
            if (key == name and not want) or key == f"{name}{{{want}}}":
                return float(value)
        return 0.0

    def wait_for(self, cond, timeout_s: float = 30.0, what: str = "condition") -> None:
        deadline = time.perf_counter() + timeout_s
        while not cond():
            if time.perf_counter() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)
