"""The `serve` and `bench` commands as users run them: config errors, graceful shutdown."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from live_server import free_port

from warmserve.cli import main
from warmserve.serve_config import default_config, parse_serve_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warmserve.cli", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_default_config_is_valid_and_local():
    cfg = default_config()
    assert cfg.listen.host == "127.0.0.1" and cfg.listen.port == 8000
    assert len(cfg.models) >= 3 and cfg.workers.device == "cpu"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"models": []}, "at least one model"),
        ({"models": [{"name": "a"}], "bogus": 1}, "unknown key 'bogus'"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "appears twice"),
        ({"models": [{"name": "a", "tp": 3}]}, "not a power of two"),
        ({"models": [{"name": "a", "tp": 4}]}, "workers.count = 2"),
        ({"models": [{"name": "a", "tp": 2}], "policy": "vanilla-autoscale"}, "a warmserve policy"),
        ({"models": [{"name": "a", "path": "/nonexistent"}]}, "no config.json"),
        ({"models": [{"name": "a"}], "policy": "nope"}, "unknown policy"),
        ({"models": [{"name": "a"}], "policy": "muxserve"}, "simulator only"),
        ({"models": [{"name": "a"}], "workers": {"count": 0}}, "count must be >= 1"),
        ({"models": [{"name": "a"}], "workers": {"device": "cuda"}}, "CUDA page pool"),
        ({"models": [{"name": "a"}], "control": {"tick_s": -1}}, "tick_s must be > 0"),
        (
            {"models": [{"name": "a"}], "policy": "warmserve", "control": {"keep_alive_s": 5}},
            "control.keep_alive_s: not read by warmserve (read by ",
        ),
        ({"models": [{"name": "a"}], "listen": {"port": "x"}}, "expected an integer"),
    ],
)
def test_bad_serve_config_is_one_clear_line(tmp_path, raw, message, capsys):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["serve", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("warmserve: error:") and message in err and "\n" not in err


def test_bench_reports_an_unreachable_endpoint(capsys):
    port = free_port()  # nothing listens there
    code = main(["bench", "--endpoint", f"http://127.0.0.1:{port}", "--models", "a", "--quiet"])
    assert code == 2
    assert "cannot reach" in capsys.readouterr().err


def test_sigterm_finishes_in_flight_requests_then_exits(tmp_path, tiny_dir):
    port = free_port()
    cfg = {"listen": {"port": port}, "workers": {"count": 1, "pool_mib": 64, "threads": 1},
           "models": [{"name": "tiny", "path": str(tiny_dir)}],
           "limits": {"shutdown_grace_s": 20}}  # fmt: skip
    parse_serve_config(cfg, tmp_path)  # valid before we start a process on it
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "warmserve.cli", "serve",
                             str(tmp_path / "serve.yaml")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ},
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.perf_counter() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.perf_counter() < deadline, "server did not start"
            time.sleep(0.2)
        chunks, started = [], threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": "x", "max_tokens": 300, "stream": True,
                    "ignore_eos": True}  # fmt: skip
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        os.killpg(proc.pid, signal.SIGTERM)  # as a service manager does: every process
        t.join(60)
        assert chunks[-1] == "[DONE]"
        finals = [json.loads(c)["choices"][0]["finish_reason"] for c in chunks[:-1]]
        assert finals[-1] == "length"  # the in-flight request ran to its end
        assert proc.wait(60) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert "died" not in out, out  # workers were stopped in order, not killed by the signal
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_tp_model_is_accepted_where_it_fits_a_node():
    from warmserve.serve_config import shard_pages_error

    cfg = parse_serve_config(
        {"workers": {"count": 4}, "models": [{"name": "a", "tp": 2}, {"name": "b", "tp": 4}]},
        Path(),
    )
    assert [m.tp for m in cfg.models] == [2, 4]
    assert shard_pages_error("a", 2, cfg.workers.num_pages - 1, cfg.workers) is None
    err = shard_pages_error("a", 2, cfg.workers.num_pages, cfg.workers)
    assert err is not None and "TP 2 shard" in err and "\n" not in err
