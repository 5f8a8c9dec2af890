"""The CUDA VMM page backend. Without a GPU only its ABI and its error path are checked here; the
`gpu`-marked tests (and the worker tests' CUDA parameter) run it for real on a CUDA machine,
through `scripts/gpu_check.sh`."""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from test_engine_golden import tiny_model
from test_pool import N, PoolMachine

from warmserve.engine.llama import LlamaShape, PagedKVCache, PagedLlama, SeqInput
from warmserve.worker import cuda_pages as cp
from warmserve.worker.layout import checkpoint_files
from warmserve.worker.pool import PagePool, PageUse
from warmserve.worker.weights import load_into_slot, memory_view

CUDA_H = next(
    (p for p in (Path("/usr/local/cuda/include/cuda.h"),
                 *sorted(Path("/usr/local").glob("cuda-*/include/cuda.h")))
     if p.is_file()),
    None,
)  # fmt: skip

LAYOUT_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <cuda.h>
int main(void) {
  printf("%zu %zu %zu\n", sizeof(CUmemLocation), offsetof(CUmemLocation, id), sizeof(CUdeviceptr));
  printf("%zu %zu %zu %zu %zu\n", sizeof(CUmemAllocationProp),
         offsetof(CUmemAllocationProp, requestedHandleTypes),
         offsetof(CUmemAllocationProp, location),
         offsetof(CUmemAllocationProp, win32HandleMetaData),
         offsetof(CUmemAllocationProp, allocFlags));
  printf("%zu %zu\n", sizeof(CUmemAccessDesc), offsetof(CUmemAccessDesc, flags));
  printf("%d %d %d %d %d\n", CU_MEM_ALLOCATION_TYPE_PINNED, CU_MEM_HANDLE_TYPE_NONE,
         CU_MEM_LOCATION_TYPE_DEVICE, CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
         CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  return 0;
}
"""


@pytest.mark.skipif(CUDA_H is None or shutil.which("gcc") is None, reason="needs cuda.h and gcc")
def test_structures_and_constants_match_cuda_h(tmp_path):
    src = tmp_path / "layout.c"
    src.write_text(LAYOUT_PROGRAM)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", f"-I{CUDA_H.parent}", str(src), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = [list(map(int, line.split())) for line in lines.splitlines()]
    prop = cp.CUmemAllocationProp
    assert got == [
        [ctypes.sizeof(cp.CUmemLocation), cp.CUmemLocation.id.offset,
         ctypes.sizeof(cp.CUdeviceptr)],
        [ctypes.sizeof(prop), prop.requestedHandleTypes.offset, prop.location.offset,
         prop.win32HandleMetaData.offset, prop.allocFlags.offset],
        [ctypes.sizeof(cp.CUmemAccessDesc), cp.CUmemAccessDesc.flags.offset],
        [cp.CU_MEM_ALLOCATION_TYPE_PINNED, cp.CU_MEM_HANDLE_TYPE_NONE,
         cp.CU_MEM_LOCATION_TYPE_DEVICE, cp.CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
         cp.CU_MEM_ALLOC_GRANULARITY_MINIMUM],
    ]  # fmt: skip


@pytest.mark.skipif(CUDA_H is None or shutil.which("gcc") is None, reason="needs cuda.h and gcc")
def test_every_bound_call_is_a_function_cuda_h_declares():
    # After preprocessing, names are the exported symbols (cuDevicePrimaryCtxRelease is a
    # macro for cuDevicePrimaryCtxRelease_v2, for instance).
    cmd = ["gcc", "-E", f"-I{CUDA_H.parent}", "-x", "c", "-"]
    out = subprocess.run(cmd, input="#include <cuda.h>\n", check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    declared = set(re.findall(r"\bCUresult\s+(cu\w+)\s*\(", out))
    assert set(cp._SIGNATURES) <= declared, set(cp._SIGNATURES) - declared


def test_a_missing_driver_is_a_clear_error():
    with pytest.raises(cp.CudaError, match="cannot load the CUDA driver"):
        cp.CudaPages(4, driver=cp.CudaDriver("libcuda-not-installed.so.1"))


# ----- on a GPU ---------------------------------------------------------------------------


def cuda_read(addr: int) -> bytes:
    return bytes(memory_view(addr, 8, "cuda").cpu().tolist())


def cuda_tag(addr: int, value: int) -> None:
    src = torch.tensor(list(value.to_bytes(8, "little")), dtype=torch.uint8)
    memory_view(addr, 8, "cuda").copy_(src)


class CudaPoolMachine(PoolMachine):
    page = 2 << 20  # the mapping granularity of current GPUs

    def make_backend(self):
        return cp.CudaPages(N, self.page)

    def read(self, addr: int) -> bytes:
        return cuda_read(addr)

    def tag(self, addr: int, value: int) -> None:
        cuda_tag(addr, value)


TestCudaPool = pytest.mark.gpu(CudaPoolMachine.TestCase)
TestCudaPool.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)


@pytest.mark.gpu
def test_remapped_page_keeps_its_bytes_on_the_gpu():
    pool = PagePool(cp.CudaPages(4))
    weights = pool.new_slot(PageUse.WEIGHTS)
    pool.grow(weights, 2)
    pool.wait_mapped(weights, 2, timeout_s=10)
    page = pool.page_bytes
    view = memory_view(weights.addr, 2 * page, "cuda")
    assert view.data_ptr() == weights.addr  # a view of the slot, not a copy
    view[page : page + 16] = torch.arange(16, dtype=torch.uint8, device="cuda")
    moved = weights.pages[1]
    kv = pool.new_slot(PageUse.KV)
    pool.free_slot(weights)  # evicted: its pages go to a KV slot, the second at index 0
    pool.grow(kv, 4)
    pool.wait_mapped(kv, 4, timeout_s=10)
    i = kv.pages.index(moved)
    got = memory_view(kv.addr + i * page, 16, "cuda").cpu()
    assert got.tolist() == list(range(16))
    pool.drain()
    pool.check()
    pool.close()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_engine_over_gpu_slots_matches_transformers_on_the_gpu(kind, tmp_path):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path)
    pool = PagePool(cp.CudaPages(4))
    params = load_into_slot(pool, pool.new_slot(PageUse.WEIGHTS), checkpoint_files(tmp_path))
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    engine = PagedLlama(shape, params)
    assert engine.device.type == "cuda" and engine.fused_layers == shape.num_layers
    cache = PagedKVCache(shape, 16, 4, torch.float32, device="cuda")
    table = [11, 3, 7, 0, 14, 5]
    ids = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = model.to("cuda")
    logits = engine.forward([SeqInput(ids, 0, table)], cache)[0]
    for _ in range(6):
        with torch.no_grad():
            want = ref(torch.tensor([ids], device="cuda")).logits[0, -1]
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
        ids.append(int(want.argmax()))
        logits = engine.forward([SeqInput(ids[-1:], len(ids) - 1, table)], cache)[0]
    pool.close()
