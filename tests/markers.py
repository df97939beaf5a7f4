"""Skip marks shared by several test files."""

import shutil

import pytest

# torch.compile on a CPU (inductor) builds C++ kernels.
needs_cpp_compiler = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler (g++ or clang++), none on PATH",
)
