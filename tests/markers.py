"""Skip marks shared by several test files."""

import shutil

import pytest

# torch.compile on a CPU (inductor) builds C++ kernels.
needs_cpp_compiler = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler (g++ or clang++), none on PATH",
)

# Whether a request recompiles is decided by dynamo's guards, whatever backend then builds the
# graph. Tests of that promise compile with aot_eager: it traces as inductor does (AOTAutograd,
# fake tensors, dynamic shapes) but builds no C++ kernels, which take minutes on a CPU. The
# tests of inductor's own artifacts (the compile cache) use inductor.
GUARDS_BACKEND = "aot_eager"
