"""gravel.tuning: the huge-pages tunable reaches the processes that run the backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gravel.tuning import HUGE_PAGES_TUNABLE, backend_env

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux's")


@linux_only
def test_backend_env_adds_huge_pages_and_keeps_other_tunables():
    assert backend_env({}) == {"GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    merged = backend_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert merged == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"}
    # set already (by the user, or by a parent that re-executed): not added twice, not changed
    assert backend_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}


def test_opt_out_leaves_the_environment_alone():
    assert backend_env({"GRAVEL_NO_HUGE_PAGES": "1"}) == {}
    assert backend_env({"GRAVEL_NO_HUGE_PAGES": "1", "GLIBC_TUNABLES": "x=1"}) == {"GLIBC_TUNABLES": "x=1"}


PROBE = """
import os, sys
from gravel.tuning import reexec_with_huge_pages
reexec_with_huge_pages()
buf = bytearray(64 << 20)  # malloc'd with mmap: glibc advises huge pages for it under the tunable
for i in range(0, len(buf), 4096):
    buf[i] = 1
huge = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        huge = int(line.split()[1])
print(os.environ.get("GLIBC_TUNABLES", ""), huge)
"""


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists() or not Path("/proc/self/smaps_rollup").exists():
        return "absent"
    return path.read_text().split("[")[1].split("]")[0]


@linux_only
def test_a_process_restarts_itself_once_with_huge_pages_and_gets_them():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GRAVEL_NO_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    tunables, _, huge_kib = out.stdout.strip("\n").rpartition(" ")
    assert tunables == HUGE_PAGES_TUNABLE
    if _thp_mode() in ("always", "madvise"):
        assert int(huge_kib) >= 2048, "the tunable was set but the buffer got no huge page"
    # opted out: no restart, no tunable, and (under madvise) no huge pages
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, "GRAVEL_NO_HUGE_PAGES": "1"},
                         capture_output=True, text=True, check=True)
    tunables, _, huge_kib = out.stdout.strip("\n").rpartition(" ")
    assert tunables == ""
    if _thp_mode() == "madvise":
        assert int(huge_kib) == 0
