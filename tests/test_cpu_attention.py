"""Decode attention read in place from the paged cache (`engine.cpu_attention`) equals the
torch path: gather the blocks, mask, `scaled_dot_product_attention`."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.engine import cpu_attention

pytestmark = pytest.mark.skipif(
    not cpu_attention.available(), reason="no C compiler for the CPU attention kernel"
)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([16, 32, 64]),
    block_size=st.sampled_from([1, 4, 16]),
    layers=st.integers(1, 3),
    window=st.sampled_from([None, 1, 3, 20]),
    seed=st.integers(0, 2**16),
)
def test_in_place_decode_attention_equals_gather_and_sdpa(
    data, kv_heads, group, head_dim, block_size, layers, window, seed
):
    g = torch.Generator().manual_seed(seed)
    blocks = 24
    storage = torch.randn(blocks, layers, 2, block_size, kv_heads, head_dim, generator=g)
    k, v = storage[:, :, 0].transpose(0, 1), storage[:, :, 1].transpose(0, 1)  # as PagedKVCache
    layer = data.draw(st.integers(0, layers - 1))
    lens = data.draw(st.lists(st.integers(1, 3 * block_size + 2), min_size=1, max_size=5))
    width = max(-(-n // block_size) for n in lens)
    # Scattered, distinct blocks per sequence; padding repeats block 0.
    perm = torch.randperm(blocks, generator=g).tolist()
    tables = torch.tensor([(perm * 5)[i * width : (i + 1) * width] for i in range(len(lens))])
    lens_t = torch.tensor(lens)
    lo = torch.zeros_like(lens_t) if window is None else lens_t - window
    heads = kv_heads * group
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    scale = head_dim**-0.5
    got = cpu_attention.decode_attention(q, k[layer], v[layer], tables, lens_t, lo, scale)
    kk = k[layer][tables].reshape(len(lens), -1, kv_heads, head_dim)
    vv = v[layer][tables].reshape(len(lens), -1, kv_heads, head_dim)
    pos = torch.arange(kk.shape[1])
    mask = (pos[None] < lens_t[:, None]) & (pos[None] >= lo[:, None])
    want = F.scaled_dot_product_attention(
        q[:, :, None], kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask[:, None, None],
        enable_gqa=True, scale=scale,
    )[:, :, 0]  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_supports_only_fp32_on_a_cpu_with_whole_vectors():
    cpu = torch.device("cpu")
    assert cpu_attention.supports(cpu, torch.float32, 64)
    assert not cpu_attention.supports(cpu, torch.bfloat16, 64)
    assert not cpu_attention.supports(cpu, torch.float32, 24)
    assert not cpu_attention.supports(torch.device("cuda"), torch.float32, 64)


def test_loading_the_kernels_leaves_the_process_floating_point_mode_alone():
    """A kernel built with -ffast-math would set flush-to-zero for the whole process when its
    library loads (gcc's crtfastmath): denormals would read as zero everywhere."""
    from warmserve.engine import cpu_linear

    assert cpu_attention.available() and cpu_linear.available()
    tiny = 5e-324  # the smallest positive double: a denormal
    assert tiny > 0
    half = torch.tensor(torch.finfo(torch.float32).tiny) / 2  # a float32 denormal
    assert float(half) > 0
