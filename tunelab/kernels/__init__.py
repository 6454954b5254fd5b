"""Native CPU kernels for the decode path, compiled for this machine on first use.

Each kernel is one C file next to a small Python module that calls it. Where a kernel
cannot be built (no C compiler, a CPU without the instructions it needs, or
TUNELAB_NATIVE_KERNELS=0) its module reports it unavailable and the model keeps to PyTorch.
"""
