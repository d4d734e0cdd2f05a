"""Process-wide settings under which the FHE backends run fastest.

Huge pages: a TFHE bootstrap streams the bootstrap key (tens of MB in the Fourier domain) once
per lookup, so with 4 KiB pages most of its time goes to TLB misses. glibc's malloc asks the
kernel for transparent huge pages when the tunable `glibc.malloc.hugetlb=1` is set (glibc 2.35
or newer; the kernel's default THP mode `madvise` honours it). Measured on the 2-core developer
VM: one ResNet shard 29.8 s -> 27.9 s alone, and 31.0-32.0 s -> 28.1-28.8 s with a second
process busy on the other core (the contention two workers saw was the TLB, not memory
bandwidth). glibc reads tunables only when a process starts, so they are set for the processes
Gravel starts (Ray workers, benchmark children) and the `gravel` command re-executes itself
once with them (`GRAVEL_NO_HUGE_PAGES=1` turns all of it off).
"""

from __future__ import annotations

import os
import sys

__all__ = ["HUGE_PAGES_TUNABLE", "backend_env", "reexec_with_huge_pages"]

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GRAVEL_NO_HUGE_PAGES"


def _wanted(env: dict[str, str] | os._Environ) -> bool:
    return sys.platform.startswith("linux") and env.get(OPT_OUT, "") in ("", "0")


def backend_env(env: dict[str, str] | os._Environ | None = None) -> dict[str, str]:
    """The variables a process that runs the backend should start with: GLIBC_TUNABLES with
    huge pages added to whatever tunables `env` (default: this process's) already sets."""
    env = os.environ if env is None else env
    tunables = env.get("GLIBC_TUNABLES", "")
    if not _wanted(env) or "glibc.malloc.hugetlb" in tunables:
        return {"GLIBC_TUNABLES": tunables} if tunables else {}
    return {"GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def reexec_with_huge_pages() -> None:
    """Restart this interpreter with the same command line and huge pages on, once; a no-op
    where they are on already, off by request, or the platform has no glibc tunables."""
    env = {**os.environ, **backend_env()}
    argv = getattr(sys, "orig_argv", None)
    if env == dict(os.environ) or not argv or not sys.executable:  # nothing to add, or no way to
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # no exec here (a restricted sandbox): run on without huge pages
        return
