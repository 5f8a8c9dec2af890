"""Models the engine would run wrong are refused, with one line naming model, architecture and
feature: from a config, from a checkpoint's tensors, at serve start-up, at worker load and by
`warmserve models check`."""

import json

import pytest
import torch
from test_architectures import tiny
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from warmserve.cli import main
from warmserve.engine.arch import UnsupportedModel, check_model_dir
from warmserve.engine.llama import LlamaShape, PagedLlama
from warmserve.serve_config import ServeConfigError, parse_serve_config
from warmserve.server import resolve_models
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool, PageUse
from warmserve.worker.worker import UniversalWorker

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip


def config(kind: str, **changes) -> dict:
    cfg = tiny(kind).config.to_dict()
    cfg.update(changes)
    return cfg


def refused(cfg: dict, *words: str) -> str:
    with pytest.raises(UnsupportedModel) as err:
        LlamaShape.from_hf_config(cfg, "m1")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model 'm1'")
    for w in words:
        assert w in msg
    return msg


@pytest.mark.parametrize(
    ("kind", "changes", "words"),
    [
        # Architectures the engine does not implement, and a mislabelled one.
        ("llama", {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"},
         ["Gemma2ForCausalLM", "not supported"]),
        ("llama", {"architectures": None, "model_type": "falcon"}, ["'falcon'", "not supported"]),
        ("qwen3", {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen2"},
         ["Qwen3ForCausalLM", "model_type 'qwen2'"]),
        # Features a supported architecture's config can turn on.
        ("mistral", {"num_local_experts": 8}, ["MistralForCausalLM", "mixture of experts"]),
        ("gemma3", {"final_logit_softcapping": 30.0}, ["Gemma3ForCausalLM", "soft-capping"]),
        ("gemma3", {"attn_logit_softcapping": 50.0}, ["Gemma3ForCausalLM", "soft-capping"]),
        ("gemma3", {"use_bidirectional_attention": True}, ["bidirectional attention"]),
        ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
         ["layer type 'chunked_attention'"]),
        ("gemma3", {"layer_types": ["full_attention"]}, ["layer_types of 1 entries"]),
        ("llama", {"hidden_act": "gelu"}, ["LlamaForCausalLM", "activation 'gelu'"]),
        ("mistral", {"attention_bias": True}, ["MistralForCausalLM", "attention_bias=true"]),
        ("qwen2", {"mlp_bias": True}, ["Qwen2ForCausalLM", "mlp_bias=true"]),
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
         ["LlamaForCausalLM", "RoPE scaling 'dynamic'"]),
        ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                      "long_factor": [1.0], "short_factor": [1.0]}},
         ["Phi3ForCausalLM", "RoPE scaling 'longrope'"]),
        ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                      "partial_rotary_factor": 0.75}},
         ["Phi3ForCausalLM", "partial rotary"]),
        ("gemma3", {"rope_parameters": {
            "sliding_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
         ["RoPE scaling 'yarn' on sliding layers"]),
        ("olmo2", {"quantization_config": {"quant_method": "gptq"}},
         ["Olmo2ForCausalLM", "quantized checkpoint", "gptq"]),
    ],
)  # fmt: skip
def test_unsupported_config_features_are_refused(kind, changes, words):
    base = {"llama": "llama-bias"}.get(kind, kind)
    refused(config(base, **changes), *words)


def test_unsupported_architectures_of_real_transformers_models_are_refused():
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=16))  # fmt: skip
    moe.config.architectures = ["Qwen3MoeForCausalLM"]
    refused(moe.config.to_dict(), "Qwen3MoeForCausalLM", "qwen3_moe", "not supported")
    gemma2 = Gemma2ForCausalLM(Gemma2Config(**SMALL))
    refused(gemma2.config.to_dict(), "'gemma2'", "not supported")
    # Mixtral-style experts on an architecture the engine runs would change every MLP.
    mixtral_like = MistralForCausalLM(MistralConfig(**SMALL)).config.to_dict()
    refused({**mixtral_like, "num_local_experts": 8}, "mixture of experts (num_local_experts=8)")


def tensors_of(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


@pytest.mark.parametrize(
    ("kind", "edit", "words"),
    [
        ("qwen3", lambda p: p.pop("model.layers.1.self_attn.q_norm.weight"),
         ["Qwen3ForCausalLM", "lacks model.layers.1.self_attn.q_norm.weight"]),
        ("olmo2", lambda p: p.update({"model.layers.0.input_layernorm.weight": torch.ones(64)}),
         ["Olmo2ForCausalLM", "does not use", "model.layers.0.input_layernorm.weight"]),
        ("gemma3", lambda p: p.update({"lm_head.weight": torch.zeros(97, 64)}),
         ["Gemma3ForCausalLM", "lm_head.weight (tie_word_embeddings is true)"]),
        ("phi3", lambda p: p.update({"model.layers.0.self_attn.qkv_proj.weight":
                                     torch.zeros(96, 64)}),
         ["Phi3ForCausalLM", "qkv_proj.weight has shape [96, 64]", "[128, 64]"]),
        ("qwen2", lambda p: [p.pop(k) for k in list(p) if k.endswith("k_proj.bias")],
         ["Qwen2ForCausalLM", "lacks model.layers.0.self_attn.k_proj.bias and 2 more"]),
    ],
)  # fmt: skip
def test_missing_unused_or_misshapen_tensors_are_refused(kind, edit, words):
    model = tiny(kind)
    shape = LlamaShape.from_hf_config(model.config.to_dict(), "m1")
    params = tensors_of(model)
    PagedLlama(shape, params, name="m1")  # as transformers built it: accepted
    edit(params)
    with pytest.raises(UnsupportedModel) as err:
        PagedLlama(shape, params, name="m1")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model 'm1'")
    for w in words:
        assert w in msg


def test_recomputed_rope_buffers_in_old_checkpoints_are_accepted():
    model = tiny("mistral")
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    params = tensors_of(model)
    params["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    PagedLlama(shape, params)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A saved tiny Qwen3-MoE folder: what a user might point `serve` at."""
    path = tmp_path_factory.mktemp("moe") / "qwen3-moe"
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=16)).save_pretrained(path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def renamed_dir(tmp_path_factory):
    """A Qwen3 folder whose checkpoint lacks its q/k norms (saved as if it were Qwen2's)."""
    path = tmp_path_factory.mktemp("qwen3") / "qwen3-no-norms"
    model = tiny("qwen3")
    model.save_pretrained(path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "_norm." not in k}, path / "model.safetensors")
    return path


def test_model_folders_are_checked_from_config_and_headers(moe_dir, renamed_dir, tmp_path):
    with pytest.raises(UnsupportedModel, match="model 'big': architecture Qwen3MoeForCausalLM"):
        check_model_dir("big", moe_dir)
    with pytest.raises(UnsupportedModel, match=r"'q3' .*Qwen3ForCausalLM.* lacks .*_norm.weight"):
        check_model_dir("q3", renamed_dir)
    good = tmp_path / "olmo2"
    tiny("olmo2").save_pretrained(good)
    assert check_model_dir("o", good).architecture == "Olmo2ForCausalLM"


def test_serve_start_up_refuses_an_unsupported_model(moe_dir, renamed_dir):
    for path, words in ((moe_dir, "Qwen3MoeForCausalLM"), (renamed_dir, "_norm.weight")):
        raw = {"models": [{"name": "mine", "path": str(path)}]}
        cfg = parse_serve_config(raw, path.parent)
        with pytest.raises(ServeConfigError) as err:
            resolve_models(cfg)  # before any tokenizer or worker
        msg = str(err.value)
        assert "\n" not in msg and "'mine'" in msg and words in msg


def test_worker_refuses_before_taking_pages(renamed_dir):
    pool = PagePool(CpuPages(8), asynchronous=False)
    worker = UniversalWorker(pool)
    with pytest.raises(UnsupportedModel, match=r"'w' .*lacks"):
        worker.prewarm("w", renamed_dir)
    assert pool.counts()[PageUse.FREE] == 8 and not worker.resident


def test_models_check_command(moe_dir, tmp_path, capsys):
    good = tmp_path / "gemma"
    tiny("gemma3").save_pretrained(good)
    assert main(["models", "check", str(good)]) == 0
    assert "Gemma3ForCausalLM" in capsys.readouterr().out
    assert main(["models", "check", str(moe_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("warmserve: error: model 'qwen3-moe'") and "Qwen3MoeForCausalLM" in err
    assert len(err.splitlines()) == 1


def test_a_config_naming_no_architecture_falls_back_to_model_type(tmp_path):
    cfg = json.loads(json.dumps(config("olmo2", architectures=None)))
    assert LlamaShape.from_hf_config(cfg).architecture == "Olmo2ForCausalLM"


def test_qwen_sliding_window_applies_only_with_use_sliding_window():
    # Qwen2.5's own config.json: a sliding_window value, switched off, no layer_types.
    off = config("qwen2", use_sliding_window=False, sliding_window=131072, layer_types=None)
    assert LlamaShape.from_hf_config(off).windows == ()
    on = config("qwen2", use_sliding_window=True, sliding_window=7, max_window_layers=2,
                layer_types=None)  # fmt: skip
    assert LlamaShape.from_hf_config(on).windows == (None, None, 7)
