"""Run inside the first of two network namespaces by `test_serve_ray.py`: serve through a
two-node Ray cluster (one node per namespace, joined by a veth pair) and print what the
client and the admin view saw, as one JSON line."""

import json
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    import openai
    from live_server import LiveServer

    address, model_dir = sys.argv[1], sys.argv[2]
    raw = {
        "workers": {"count": 1, "pool_mib": 640, "threads": 1},
        "models": [
            {"name": "a", "path": model_dir, "max_model_len": 512},
            {"name": "b", "path": model_dir, "max_model_len": 512},
        ],
        "runtime": {"kind": "ray", "address": address},
    }
    with LiveServer(raw, Path(tempfile.mkdtemp())) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0,
                               timeout=120)  # fmt: skip
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        outs = {m: client.chat.completions.create(model=m, messages=msgs, max_tokens=8,
                                                  temperature=0).choices[0].message.content
                for m in ("a", "b")}  # fmt: skip
        view = live.admin()
    print(json.dumps({
        "outs": outs,
        "workers": [[w["worker"], w["node"], w["alive"]] for w in view["workers"]],
        "instances": [[i["model"], i["worker"]] for i in view["instances"]],
    }))  # fmt: skip
