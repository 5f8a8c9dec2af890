"""Golden test on a real pretrained model: SmolLM2-135M-Instruct, prepared from its GGUF."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from warmserve.engine.engine import Engine
from warmserve.engine.kv_blocks import BlockAllocator
from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama, SeqInput
from warmserve.engine.request import SamplingParams
from warmserve.engine.scheduler import Scheduler


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    path = smollm2_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def test_smollm2_logits_and_greedy_tokens_match_transformers(smol):
    model, tok = smol
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    assert (shape.num_layers, shape.hidden_size, shape.num_kv_heads) == (30, 576, 3)
    engine = PagedLlama(shape, model.state_dict())
    cache = PagedKVCache(shape, 32, 16, torch.float32)
    ours = engine.forward([SeqInput(ids, 0, list(range(31, -1, -1)))], cache)[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)

    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[
            0, len(ids) :
        ]
    sched = Scheduler(BlockAllocator(64, 16))
    eng = Engine(engine, PagedKVCache(shape, 64, 16, torch.float32), sched, tok.eos_token_id)
    got = eng.generate([ids], SamplingParams(max_tokens=12))[0]
    assert got == want.tolist()[: len(got)]
    assert "Paris" in tok.decode(got)
