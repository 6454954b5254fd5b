"""Compile a kernel's C file into a shared library once per source, CPU and torch version, and load it.

The library is built with the system C compiler for this CPU (`-march=native`) into
`$TUNELAB_HOME/cache/kernels/`, named by a hash of the source and the headers beside it, the
flags, the CPU's feature flags and torch's version, and written under a temporary name first,
so a half-built library is never loaded; it replaces that kernel's earlier builds. It links
against the OpenMP runtime torch itself loaded (same `libgomp.so.1`), so kernels and torch share
one thread pool instead of two pools fighting over the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# No contraction of a * b + c into one FMA: the kernels' float steps must round as torch's separate ops do.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is no /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _kernel_dir() -> Path:
    from tunelab.registry.store import default_store_root

    return default_store_root() / "cache" / "kernels"


@functools.cache
def load(name: str, needs: frozenset[str], libraries: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The library built from `<name>.c` (linked with `libraries`, e.g. "mvec"), or None when it cannot
    run here: the CPU lacks one of `needs`, there is no compiler, it fails to build, or
    TUNELAB_NATIVE_KERNELS=0."""
    flags = cpu_flags()
    if os.environ.get("TUNELAB_NATIVE_KERNELS", "1") == "0" or not needs <= flags:
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler found: the %s kernel is not used", name)
        return None
    source = Path(__file__).with_name(f"{name}.c")
    link = [f"-l{library}" for library in libraries]
    headers = [header.read_text() for header in sorted(source.parent.glob("*.h"))]
    identity = "|".join([source.read_text(), *headers, *FLAGS, *link, *sorted(flags), torch.__version__])
    target = _kernel_dir() / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), *link],
                               check=True, capture_output=True, text=True, timeout=300)
                os.replace(built, target)
            _remove_older_builds(name, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("the %s kernel could not be built, PyTorch's ops run instead: %s",
                    name, getattr(error, "stderr", None) or error)
        return None


def _remove_older_builds(name: str, current: Path) -> None:
    """Delete this kernel's builds from other sources, flags or torch versions: each new build replaces
    them (a process that already loaded one keeps its mapping; one that needs it again rebuilds it)."""
    for old in current.parent.glob(f"{name}-*.so"):
        if old != current and old.stem.rpartition("-")[0] == name:
            old.unlink(missing_ok=True)


def address(function: ctypes._CFuncPtr) -> int:
    """A loaded kernel's entry point as an integer, for `call_list`."""
    return ctypes.cast(function, ctypes.c_void_p).value
