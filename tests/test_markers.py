"""The skip marks skip exactly where what they need is missing, and say what to install."""

from __future__ import annotations

import sysconfig

from tests import markers


def test_the_compile_tests_skip_without_pythons_headers_naming_the_package(monkeypatch, tmp_path):
    """A C++ compiler alone is not enough: inductor's kernels include Python.h."""
    monkeypatch.setattr(markers.shutil, "which", lambda name: f"/usr/bin/{name}")
    real = sysconfig.get_path
    monkeypatch.setattr(
        sysconfig,
        "get_path",
        lambda name, *a, **k: str(tmp_path) if name == "include" else real(name, *a, **k),
    )
    assert "python3.11-dev" in markers.cpp_toolchain_missing()
    (tmp_path / "Python.h").write_text("")
    assert markers.cpp_toolchain_missing() is None


def test_the_compile_tests_skip_without_a_cpp_compiler(monkeypatch):
    monkeypatch.setattr(markers.shutil, "which", lambda name: None)
    assert "C++ compiler" in markers.cpp_toolchain_missing()
