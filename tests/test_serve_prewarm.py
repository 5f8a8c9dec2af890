"""Prior prewarming and idle-instance demotion on the real server (warmserve-plus).

A default-like server (three models, two workers with room for two models each, default
control settings) and no history: every model's first request must be a prewarm hit, and
a request for a model whose workers hold only idle instances must start at once by demoting
one of them. Asserted from the start paths in /metrics, not from times."""

import openai
from live_server import LiveServer

NAMES = ("tiny-a", "tiny-b", "tiny-c")


def starts(srv: LiveServer, name: str) -> dict[str, float]:
    return {
        path: srv.metric("warmserve:instance_starts_total", model_name=name, path=path)
        for path in ("prewarm_hit", "inprogress_hit", "cold")
    }


def test_first_requests_are_prewarm_hits_and_never_wait_behind_idle_instances(tiny_dir, tmp_path):
    raw = {
        # A tiny model is 7 pages of 2 MiB: 20 pages hold two models and their KV floor.
        "workers": {"count": 2, "pool_mib": 40, "threads": 1},
        "models": [{"name": n, "path": str(tiny_dir)} for n in NAMES],
        "policy": "warmserve-plus",
        "control": {"capacity_per_instance": 8},
        # Waiting for an idle instance's keep-alive (30 s) would fail the request.
        "limits": {"queue_timeout_s": 3.0},
    }
    with LiveServer(raw, tmp_path) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

        def all_warm() -> bool:
            return all(s in ("prewarmed", "serving") for s in srv.states().values())

        # No history: nothing forecasts any load, yet the free pages hold every model.
        srv.wait_for(all_warm, 60, "every model prewarmed at start-up")
        for name in NAMES:
            before = srv.admin()
            out = client.completions.create(model=name, prompt="a", max_tokens=2)
            assert out.choices[0].finish_reason in ("stop", "length")
            assert starts(srv, name) == {"prewarm_hit": 1, "inprogress_hit": 0, "cold": 0}, (
                name,
                before,
            )
            # An activation takes its worker's pool as KV; the models it displaced are
            # prewarmed again (into free or lent pages) before the next first request.
            srv.wait_for(all_warm, 60, f"every model warm after {name}")
        # The third model found both workers holding idle instances (kept alive 30 s): one
        # was demoted to a prewarmed replica at once, not after its keep-alive.
        idle = [i for i in srv.admin()["instances"] if i["requests"] == 0]
        assert len(idle) == 2
        assert srv.metric("warmserve:request_failure_total", model_name="tiny-c",
                          reason="queue_timeout") == 0  # fmt: skip
        # The control plane's memory actions are exported: priors, re-prewarms, lends.
        assert srv.metric("warmserve:control_memory_actions", kind="prewarms") >= 3
        assert srv.metric("warmserve:control_memory_actions", kind="kv_lends") >= 1
        srv.server.runtime.cluster.check()
