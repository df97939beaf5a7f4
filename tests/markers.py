"""Skip marks shared by several test files."""

import shutil
import sysconfig
from pathlib import Path

import pytest


def cpp_toolchain_missing() -> str | None:
    """Why inductor cannot build CPU kernels here, or None.

    Its kernels are C++ with Python bindings: a compiler alone fails on `#include <Python.h>`
    where the interpreter's headers are not installed (Debian's python3.11 without
    python3.11-dev), so both are looked for.
    """
    if not (shutil.which("g++") or shutil.which("clang++")):
        return "torch.compile's CPU backend needs a C++ compiler (g++ or clang++), none on PATH"
    headers = Path(sysconfig.get_path("include"))
    if not (headers / "Python.h").is_file():
        return (
            f"torch.compile's CPU backend needs Python's headers, no Python.h in {headers} "
            "(Debian: apt-get install python3.11-dev)"
        )
    return None


# torch.compile on a CPU (inductor) builds C++ kernels.
needs_cpp_compiler = pytest.mark.skipif(
    cpp_toolchain_missing() is not None, reason=cpp_toolchain_missing() or ""
)

# Whether a request recompiles is decided by dynamo's guards, whatever backend then builds the
# graph. Tests of that promise compile with aot_eager: it traces as inductor does (AOTAutograd,
# fake tensors, dynamic shapes) but builds no C++ kernels, which take minutes on a CPU. The
# tests of inductor's own artifacts (the compile cache) use inductor.
GUARDS_BACKEND = "aot_eager"
