"""A TP 2 model on Ray actors (a private Ray cluster on loopback): the actors of a node build
their TP world at start like local workers, and the TP 2 instance answers as TP 1 does."""

import openai
from live_server import LiveServer

CONTROL = {"capacity_per_instance": 4, "scale_window_s": 1.0, "protect_period_s": 1.0,
           "tick_s": 0.1}  # fmt: skip


def test_a_tp2_model_on_ray_actors_answers_as_tp1(tiny_dir, tmp_path):
    raw = {
        "workers": {"count": 2, "pool_mib": 256, "threads": 1},
        "models": [
            {"name": "tiny-tp1", "path": str(tiny_dir)},
            {"name": "tiny-tp2", "path": str(tiny_dir), "tp": 2},
        ],
        "control": CONTROL,
        "runtime": {"kind": "ray"},
        "limits": {"shutdown_grace_s": 5},
    }
    with LiveServer(raw, tmp_path) as live:
        workers = live.admin()["workers"]
        assert len({w["node"] for w in workers}) == 1
        assert all(w["tp_groups_build_s"] > 0 for w in workers)
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                               timeout=120)  # fmt: skip
        kw = {"prompt": "hello there", "max_tokens": 8, "temperature": 0,
              "extra_body": {"ignore_eos": True}}  # fmt: skip
        want = client.completions.create(model="tiny-tp1", **kw).choices[0].text
        stream = client.completions.create(model="tiny-tp2", stream=True, **kw)
        pieces, spans = [], []
        for c in stream:
            if not spans:  # while the stream is open its instance is live (idle ones may stop)
                spans = [i["workers"] for i in live.admin()["instances"]
                         if i["model"] == "tiny-tp2"]  # fmt: skip
            pieces.append(c.choices[0].text)
        assert "".join(pieces) == want
        assert spans == [[0, 1]]
    import ray

    assert not ray.is_initialized()
