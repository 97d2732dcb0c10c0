"""Host memory on a CPU: glibc's thresholds fixed once per process, unless the user chose otherwise."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lightning_mp.runtime import host_memory
from lightning_mp.runtime.host_memory import keep_freed_host_memory


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_thresholds_are_set_where_glibc_allocates() -> None:
    code = "from lightning_mp.runtime.host_memory import keep_freed_host_memory as k; print(k())"
    env = {"PATH": "", "PYTHONPATH": ":".join(sys.path)}  # none of the user's MALLOC_* settings
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize(
    "setting", [("LIGHTNING_MP_HOST_MALLOC", "0"), ("MALLOC_TRIM_THRESHOLD_", "1000"), ("MALLOC_MMAP_THRESHOLD_", "1")]
)
def test_the_users_choice_is_left_alone(monkeypatch: pytest.MonkeyPatch, setting: tuple[str, str]) -> None:
    monkeypatch.setenv(*setting)
    assert keep_freed_host_memory() is False


def test_nothing_is_set_outside_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", ""))
    assert keep_freed_host_memory() is False
