"""glibc malloc keeps freed blocks for reuse in CPU training."""

import platform

import pytest

from fraglm import allocator

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc, reason="glibc only")
def test_glibc_accepts_the_settings():
    assert allocator.keep_freed_memory()
    assert allocator.keep_freed_memory()  # idempotent


def test_elsewhere_nothing_changes(monkeypatch):
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert not allocator.keep_freed_memory()
