"""The engine's C kernels for CPUs (`warmserve/data/kernels/*.c`), built for the host on first
use and loaded with ctypes (whose calls release the GIL).

A kernel is compiled with the system C compiler (`$CC`, else `cc`, else `gcc`) at
`-march=native`, a fraction of a second, and cached under `~/.cache/warmserve/kernels`
(`$WARMSERVE_KERNEL_CACHE`), keyed by its source, the flags, the compiler's version and the
CPU's flags: a binary cached on a shared home never runs on a CPU without its instructions.
Where no compiler is found or the build fails, `load` returns None and the engine keeps its
torch paths; `WARMSERVE_CPU_KERNEL=0` does the same on purpose.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent.parent / "data" / "kernels"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "warmserve" / "kernels"
    return Path(os.environ.get("WARMSERVE_KERNEL_CACHE", default))


def _cpu_key() -> str:
    """What `-march=native` compiles for."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        keys = ("flags", "model name", "Features")
        lines = [ln for ln in info.splitlines() if ln.startswith(keys)]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() + platform.machine()


def enabled() -> bool:
    return os.environ.get("WARMSERVE_CPU_KERNEL", "1") != "0"


@functools.cache
def load(name: str, flags: tuple[str, ...], libs: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Kernel `name` (`SOURCES/name.c`) built with `flags` (and linked with `libs`), or None."""
    if not enabled():
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: the engine runs without its CPU kernels")
        return None
    source = SOURCES / f"{name}.c"
    args = (*flags, "-shared", "-fPIC")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout  # fmt: skip
        blob = "\0".join([source.read_text(), version, " ".join(args + libs), _cpu_key()])
        out = cache_dir() / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            # Built beside its final name and renamed: workers starting together may race.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            try:
                subprocess.run([cc, *args, "-o", tmp, str(source), *libs], check=True,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError) as e:
        lines = str(getattr(e, "stderr", "") or e).strip().splitlines()
        log.warning("CPU kernel %s did not build (%s): the engine runs without it", name,
                    lines[-1] if lines else e)  # fmt: skip
        return None
