"""gravel.tuning: the backend's tunables (huge pages, freed memory kept) reach the processes
that run the backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gravel.tuning import BACKEND_TUNABLES, backend_env

ALL = ":".join(BACKEND_TUNABLES)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux's")


@linux_only
def test_backend_env_adds_its_tunables_and_keeps_other_tunables():
    assert backend_env({}) == {"GLIBC_TUNABLES": ALL}
    assert "glibc.malloc.hugetlb=1" in ALL and "glibc.malloc.mmap_max=0" in ALL
    merged = backend_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert merged == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{ALL}"}
    # set already (by the user, or by a parent that re-executed): not added twice, not changed
    user = backend_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=4"})["GLIBC_TUNABLES"]
    assert user.split(":")[:2] == ["glibc.malloc.hugetlb=0", "glibc.malloc.mmap_max=4"]
    assert user.count("hugetlb") == 1 and user.count("mmap_max") == 1 and "trim_threshold" in user
    assert backend_env({"GLIBC_TUNABLES": ALL}) == {"GLIBC_TUNABLES": ALL}


def test_opt_out_leaves_the_environment_alone():
    assert backend_env({"GRAVEL_NO_HUGE_PAGES": "1"}) == {}
    assert backend_env({"GRAVEL_NO_HUGE_PAGES": "1", "GLIBC_TUNABLES": "x=1"}) == {"GLIBC_TUNABLES": "x=1"}


PROBE = """
import os, sys
from gravel.tuning import reexec_with_huge_pages
reexec_with_huge_pages()

def rollup(field):
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

buf = bytearray(64 << 20)  # a large block: glibc advises huge pages for it under the tunable
for i in range(0, len(buf), 4096):
    buf[i] = 1
huge, rss = rollup("AnonHugePages"), rollup("Rss")
del buf  # freed: kept by the process under mmap_max=0 and a high trim threshold, else unmapped
kept = rss - rollup("Rss")
print(os.environ.get("GLIBC_TUNABLES", ""), huge, kept, sep="|")
"""


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists() or not Path("/proc/self/smaps_rollup").exists():
        return "absent"
    return path.read_text().split("[")[1].split("]")[0]


@linux_only
def test_a_process_restarts_itself_once_with_the_tunables_and_gets_huge_pages_and_keeps_freed_memory():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GRAVEL_NO_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    tunables, huge_kib, released_kib = out.stdout.strip().split("|")
    assert tunables == ALL
    if _thp_mode() in ("always", "madvise"):
        assert int(huge_kib) >= 2048, "the tunable was set but the buffer got no huge page"
    assert int(released_kib) < 8 << 10, "the freed 64 MB went back to the kernel: the next call faults it in again"
    # opted out: no restart, no tunable, and (under madvise) no huge pages
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, "GRAVEL_NO_HUGE_PAGES": "1"},
                         capture_output=True, text=True, check=True)
    tunables, huge_kib, released_kib = out.stdout.strip().split("|")
    assert tunables == ""
    assert int(released_kib) >= 60 << 10  # glibc's default: a block this large is mmapped and unmapped
    if _thp_mode() == "madvise":
        assert int(huge_kib) == 0
