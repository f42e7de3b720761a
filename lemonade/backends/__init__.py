"""Backends: one module per engine, and `registry`, which maps recipes to them."""

LLAMACPP_BACKENDS = ("vulkan", "rocm", "metal")  # what C++ GA's `--llamacpp` accepts
