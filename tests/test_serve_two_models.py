"""Two real, different models behind one endpoint: SmolLM2-135M (Llama) and Gemma-3-270M
(Gemma 3), named by their packaged paths as a serve file lists them."""

import httpx
import pytest
import torch
from live_server import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from warmserve.serve_config import DEFAULT_YAML, parse_serve_config
from warmserve.server import BackgroundServer


def test_default_serve_file_lists_gemma3_as_a_packaged_model(tmp_path):
    import yaml

    raw = yaml.safe_load(DEFAULT_YAML.replace("  # - {name: gemma3-270m", "  - {name: gemma3-270m"))
    cfg = parse_serve_config(raw, tmp_path)  # a packaged path: no folder needed yet
    assert [m.path for m in cfg.models][-1] == "gemma3-270m"


@pytest.mark.slow
def test_smollm2_and_gemma3_are_served_side_by_side(smollm2_dir, gemma3_dir, tmp_path):
    # Token ids, BOS included as each tokenizer adds it: the gateway encodes text prompts
    # without special tokens, and Gemma without its BOS answers badly.
    prompt = "The Eiffel Tower is in the city of"
    want, prompts = {}, {}
    for name, path in (("smollm2", smollm2_dir), ("gemma3-270m", gemma3_dir)):
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = prompts[name] = tok(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        want[name] = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        del model
    raw = {
        "listen": {"port": free_port()},
        "workers": {"count": 2, "pool_mib": 1280, "threads": 1},
        "models": [
            {"name": "smollm2", "path": "smollm2", "max_model_len": 512},
            {"name": "gemma3-270m", "path": "gemma3-270m", "max_model_len": 512},
        ],
        "control": {"capacity_per_instance": 4, "tick_s": 0.1},
    }
    folders = {"smollm2": smollm2_dir, "gemma3-270m": gemma3_dir}
    with BackgroundServer(parse_serve_config(raw, tmp_path), folders.__getitem__) as srv:
        ids = {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert ids == {"smollm2", "gemma3-270m"}
        for name in ("gemma3-270m", "smollm2"):
            r = httpx.post(
                srv.url + "/v1/completions",
                json={"model": name, "prompt": prompts[name], "max_tokens": 6, "temperature": 0},
                timeout=300,
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want[name]
    assert "Paris" in want["gemma3-270m"]
