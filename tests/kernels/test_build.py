"""Kernel builds: one library per kernel in the cache, a new build replacing the kernel's earlier ones."""

import shutil

import pytest

from tunelab.kernels import build

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or "avx512f" not in build.cpu_flags(),
                                reason="needs a C compiler and AVX-512")


def test_a_new_build_replaces_the_kernels_older_builds_only(tunelab_home):
    kernels = tunelab_home / "cache" / "kernels"
    kernels.mkdir(parents=True)
    older, other = kernels / "rms_norm-0123456789abcdef.so", kernels / "rms_norm_extra-0123456789abcdef.so"
    older.write_bytes(b"an earlier build")
    other.write_bytes(b"another kernel's build")
    build.load.cache_clear()
    try:
        assert build.load("rms_norm", frozenset({"avx512f"})) is not None
    finally:
        build.load.cache_clear()
    assert not older.exists() and other.exists()
    assert len(list(kernels.glob("rms_norm-*.so"))) == 1  # the new build
