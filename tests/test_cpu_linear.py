"""The CPU linear kernel over packed weights (`engine.cpu_linear`) and the worker that packs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from warmserve.engine import cpu_linear
from warmserve.engine.request import SamplingParams
from warmserve.worker.layout import weight_pages
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool
from warmserve.worker.worker import UniversalWorker

pytestmark = pytest.mark.skipif(
    not cpu_linear.available(), reason="no C compiler for the CPU linear kernel"
)


def packed(w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(w.numel(), dtype=torch.float32)
    view = cpu_linear.packed_view(out, tuple(w.shape))
    cpu_linear.pack_into(view, w)
    return view


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 40),  # past one 12-row register block, and none at all
    k=st.integers(1, 130),
    tiles=st.integers(1, 4),
    bias=st.booleans(),
    lead=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 2**16),
)
def test_packed_linear_equals_f_linear(rows, k, tiles, bias, lead, seed):
    g = torch.Generator().manual_seed(seed)
    n = tiles * cpu_linear.TILE
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(*lead, rows, k, generator=g)
    wp = packed(w)
    assert cpu_linear.is_packed(wp) and cpu_linear.logical_shape(wp) == (n, k)
    assert torch.equal(cpu_linear.unpack(wp), w)  # a permutation: every value kept
    got = cpu_linear.linear(x, wp, b)
    assert got.shape == (*lead, rows, n)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-4)


def test_non_contiguous_and_strided_inputs():
    w = torch.randn(64, 48)
    x = torch.randn(48, 10).t()  # a transposed view
    torch.testing.assert_close(cpu_linear.linear(x, packed(w)), F.linear(x, w))


def test_rows_of_a_packed_weight_are_its_rows():
    w = torch.randn(96, 20)
    ids = torch.tensor([0, 95, 31, 32, 31, 7])
    assert torch.equal(cpu_linear.rows(packed(w), ids), w[ids])
    assert torch.equal(cpu_linear.rows(w, ids), w[ids])


def test_plain_weights_take_the_blas_path():
    w, x = torch.randn(8, 5), torch.randn(3, 5)
    assert not cpu_linear.is_packed(w)
    assert torch.equal(cpu_linear.linear(x, w), F.linear(x, w))


def test_only_whole_tile_fp32_projections_are_packed():
    ok = "model.layers.0.self_attn.q_proj.weight"
    assert cpu_linear.packable(ok, (64, 48), torch.float32)
    assert not cpu_linear.packable(ok, (48, 64), torch.float32)  # 48 outputs: no whole tile
    assert not cpu_linear.packable(ok, (64, 48), torch.bfloat16)
    assert not cpu_linear.packable("model.embed_tokens.weight", (64, 48), torch.float32)
    assert cpu_linear.packable("model.embed_tokens.weight", (64, 48), torch.float32, tied=True)
    assert cpu_linear.packable("lm_head.weight", (64, 48), torch.float32)
    assert not cpu_linear.packable("model.norm.weight", (64, 48), torch.float32)
    assert not cpu_linear.packable("model.layers.0.self_attn.q_proj.bias", (64,), torch.float32)


def test_packing_follows_the_device_and_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_linear.use_packing("cpu")
    assert not cpu_linear.use_packing("cuda")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the BLAS's threads win there
    assert not cpu_linear.use_packing("cpu")
    assert cpu_linear.use_packing("cpu", want=True)  # asked for: packed on any threads
    assert not cpu_linear.use_packing("cuda", want=True)
    assert not cpu_linear.use_packing("cpu", want=False)


@pytest.mark.parametrize("tied", [False, True])
def test_a_worker_that_packs_serves_the_same_tokens(tmp_path, tied):
    """Prewarm packs straight into the slot (no more pages), activation copies nothing, and
    greedy tokens equal those of the plain layout; the LM head is packed too, and a tied
    embedding (the LM head itself) serves its lookups from the packed layout."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tied)  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path)
    pages = weight_pages(tmp_path, 2 << 20)
    out = {}
    for pack in (False, True):
        worker = UniversalWorker(PagePool(CpuPages(pages + 2)), block_size=4, pack_weights=pack)
        worker.prewarm("m", tmp_path)
        params = worker.resident["m"].params
        assert sum(cpu_linear.is_packed(t) for t in params.values()) == (15 if pack else 0)
        embed = params["model.embed_tokens.weight"]
        assert cpu_linear.is_packed(embed) == (pack and tied)
        assert len(worker.resident["m"].slot.pages) == pages
        copied = worker.pool.bytes_copied
        engine = worker.activate("m")
        assert worker.pool.bytes_copied == copied
        out[pack] = engine.generate([[5, 6, 7], list(range(3, 40))],
                                    SamplingParams(max_tokens=12, ignore_eos=True))  # fmt: skip
        worker.close()
        worker.pool.close()
    assert out[True] == out[False]
