"""CUDA device memory as pages, through the driver's virtual memory management (VMM) API.

The same four operations as `CpuPages`, on the GPU: every page is one physical allocation made
at start (`cuMemCreate`), a slot is a reserved virtual range (`cuMemAddressReserve`), mapping
puts a page at an offset of a range and opens it to the device (`cuMemMap` + `cuMemSetAccess`),
unmapping takes it out (`cuMemUnmap`). A page keeps its contents across remaps, so a model's
evicted weight pages become another model's KV cache without a copy.

The driver is called through ctypes on `libcuda.so.1`, like the CPU backend calls libc: no
binding package to pin, and the VMM calls are stable since CUDA 10.2. The structures below
mirror `cuda.h` (a test checks their layout against the header when one is installed).

Contexts: the pages live in the device's primary context, the one PyTorch uses, so tensors over
the mapped ranges work in PyTorch. The pool calls the backend from its mapping thread, so every
call makes that context current first. `unmap_page` synchronizes the context before unmapping:
kernels queued earlier may still read the page.
"""

from __future__ import annotations

import ctypes
import threading

# Enum values from cuda.h.
CU_MEM_ALLOCATION_TYPE_PINNED = 0x1
CU_MEM_HANDLE_TYPE_NONE = 0x0
CU_MEM_LOCATION_TYPE_DEVICE = 0x1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0

CUdeviceptr = ctypes.c_ulonglong
CUmemGenericAllocationHandle = ctypes.c_ulonglong


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", CUmemAllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


class CudaError(RuntimeError):
    pass


# name -> argument types; every call returns a CUresult (int).
# fmt: off
_SIGNATURES: dict[str, list] = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
    "cuCtxSetCurrent": [ctypes.c_void_p],
    "cuCtxSynchronize": [],
    "cuMemGetAllocationGranularity": [
        ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(CUmemAllocationProp), ctypes.c_int,
    ],
    "cuMemCreate": [
        ctypes.POINTER(CUmemGenericAllocationHandle), ctypes.c_size_t,
        ctypes.POINTER(CUmemAllocationProp), ctypes.c_ulonglong,
    ],
    "cuMemRelease": [CUmemGenericAllocationHandle],
    "cuMemAddressReserve": [
        ctypes.POINTER(CUdeviceptr), ctypes.c_size_t, ctypes.c_size_t, CUdeviceptr,
        ctypes.c_ulonglong,
    ],
    "cuMemAddressFree": [CUdeviceptr, ctypes.c_size_t],
    "cuMemMap": [
        CUdeviceptr, ctypes.c_size_t, ctypes.c_size_t, CUmemGenericAllocationHandle,
        ctypes.c_ulonglong,
    ],
    "cuMemSetAccess": [
        CUdeviceptr, ctypes.c_size_t, ctypes.POINTER(CUmemAccessDesc), ctypes.c_size_t,
    ],
    "cuMemUnmap": [CUdeviceptr, ctypes.c_size_t],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}
# fmt: on


class CudaDriver:
    """The driver calls the backend uses, each raising `CudaError` on failure."""

    def __init__(self, library: str = "libcuda.so.1") -> None:
        try:
            self._lib = ctypes.CDLL(library)
        except OSError as e:
            raise CudaError(f"cannot load the CUDA driver ({library}): {e}") from None
        for name, argtypes in _SIGNATURES.items():
            try:
                fn = getattr(self._lib, name)
            except AttributeError:
                raise CudaError(f"{library} lacks {name} (driver too old?)") from None
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int

    def __call__(self, name: str, *args: object) -> None:
        result = getattr(self._lib, name)(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorString(result, ctypes.byref(text))
            detail = text.value.decode() if text.value else "unknown error"
            raise CudaError(f"{name} failed: CUDA error {result} ({detail})")


class CudaPages:
    """`num_pages` physical pages of `page_bytes` on CUDA device `device`, created at start."""

    def __init__(
        self,
        num_pages: int,
        page_bytes: int = 2 << 20,
        device: int = 0,
        driver: CudaDriver | None = None,
    ) -> None:
        if num_pages < 1:
            raise ValueError("need >= 1 page")
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self.device = f"cuda:{device}"
        self._ordinal = device
        self._cu = driver or CudaDriver()
        self._cu("cuInit", 0)
        dev = ctypes.c_int()
        self._cu("cuDeviceGet", ctypes.byref(dev), device)
        self._dev = dev.value
        self._ctx = ctypes.c_void_p()
        self._cu("cuDevicePrimaryCtxRetain", ctypes.byref(self._ctx), self._dev)
        self._current = threading.local()
        self._use_context()

        self._prop = CUmemAllocationProp()
        self._prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE
        self._prop.location = CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, self._dev)
        self._access = CUmemAccessDesc(
            CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, self._dev),
            CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        )
        gran = ctypes.c_size_t()
        self._cu("cuMemGetAllocationGranularity", ctypes.byref(gran), ctypes.byref(self._prop),
                 CU_MEM_ALLOC_GRANULARITY_MINIMUM)  # fmt: skip
        self.granularity = gran.value
        if page_bytes % self.granularity:
            self._release_context()
            raise ValueError(
                f"page size {page_bytes} is not a multiple of the device's mapping granularity "
                f"{self.granularity}"
            )
        self._handles: list[int] = []
        try:
            for _ in range(num_pages):
                handle = CUmemGenericAllocationHandle()
                self._cu("cuMemCreate", ctypes.byref(handle), page_bytes,
                         ctypes.byref(self._prop), 0)  # fmt: skip
                self._handles.append(handle.value)
        except CudaError:
            self.close()
            raise

    def _use_context(self) -> None:
        # Contexts are current per thread; the pool maps from its own thread.
        if getattr(self._current, "ctx", None) != self._ctx.value:
            self._cu("cuCtxSetCurrent", self._ctx)
            self._current.ctx = self._ctx.value

    def reserve(self, num_bytes: int) -> int:
        self._use_context()
        ptr = CUdeviceptr()
        self._cu("cuMemAddressReserve", ctypes.byref(ptr), num_bytes, self.page_bytes, 0, 0)
        return int(ptr.value)

    def release(self, addr: int, num_bytes: int) -> None:
        self._use_context()
        self._cu("cuMemAddressFree", addr, num_bytes)

    def map_page(self, addr: int, page: int) -> None:
        assert 0 <= page < self.num_pages
        self._use_context()
        self._cu("cuMemMap", addr, self.page_bytes, 0, self._handles[page], 0)
        self._cu("cuMemSetAccess", addr, self.page_bytes, ctypes.byref(self._access), 1)

    def unmap_page(self, addr: int) -> None:
        self._use_context()
        self._cu("cuCtxSynchronize")  # work queued earlier may still touch the page
        self._cu("cuMemUnmap", addr, self.page_bytes)

    def _release_context(self) -> None:
        if self._ctx.value is not None:
            self._cu("cuDevicePrimaryCtxRelease_v2", self._dev)
            self._ctx = ctypes.c_void_p()

    def close(self) -> None:
        if self._ctx.value is None:
            return
        self._use_context()
        for handle in self._handles:
            self._cu("cuMemRelease", handle)
        self._handles = []
        self._release_context()
