"""Process-wide settings under which the FHE backends run fastest.

Huge pages: a TFHE bootstrap streams the bootstrap key (tens of MB in the Fourier domain) once
per lookup, so with 4 KiB pages most of its time goes to TLB misses. glibc's malloc asks the
kernel for transparent huge pages when the tunable `glibc.malloc.hugetlb=1` is set (glibc 2.35
or newer; the kernel's default THP mode `madvise` honours it). Measured on the 2-core developer
VM: one ResNet shard 29.8 s -> 27.9 s alone, and 31.0-32.0 s -> 28.1-28.8 s with a second
process busy on the other core (the contention two workers saw was the TLB, not memory
bandwidth).

Keeping freed memory: every backend call allocates its large buffers afresh (concrete converts
the bootstrap keys into new Fourier-domain vectors, 107 + 175 MB for the ResNet-style CNN's two
keys; a convolution's window gather is hundreds of MB) and frees them at its end. glibc serves
such blocks with mmap and hands them back with munmap, so the next call faults every page in
again and the kernel zeroes it: 6 % of a ResNet shard's time in a plain process and 10 % in a
Ray worker (perf, `clear_page_erms`) on the developer VM. `glibc.malloc.mmap_max=0` makes malloc
take every block from the heap, and a high `glibc.malloc.trim_threshold` keeps the heap's freed
top instead of returning it, so the second call reuses the first call's pages. The cost: a
process keeps the peak of its heap until it ends (the workers and the `gravel` command hold
about the largest call's buffers anyway).

glibc reads tunables only when a process starts, so they are set for the processes Gravel starts
(Ray workers, benchmark children) and the `gravel` command re-executes itself once with them
(`GRAVEL_NO_HUGE_PAGES=1` turns all of it off). A tunable the environment sets already is kept
as it is.
"""

from __future__ import annotations

import os
import sys

__all__ = ["BACKEND_TUNABLES", "HUGE_PAGES_TUNABLE", "backend_env", "reexec_with_huge_pages"]

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# in the order they are appended; names only where the environment has none of its own
BACKEND_TUNABLES = (
    HUGE_PAGES_TUNABLE,
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={1 << 36}",
)
OPT_OUT = "GRAVEL_NO_HUGE_PAGES"


def _wanted(env: dict[str, str] | os._Environ) -> bool:
    return sys.platform.startswith("linux") and env.get(OPT_OUT, "") in ("", "0")


def backend_env(env: dict[str, str] | os._Environ | None = None) -> dict[str, str]:
    """The variables a process that runs the backend should start with: GLIBC_TUNABLES with
    Gravel's tunables (huge pages, freed memory kept) added to whatever `env` (default: this
    process's) already sets; a tunable set there already is left as it is."""
    env = os.environ if env is None else env
    tunables = env.get("GLIBC_TUNABLES", "")
    if not _wanted(env):
        return {"GLIBC_TUNABLES": tunables} if tunables else {}
    present = {item.split("=", 1)[0] for item in tunables.split(":") if item}
    added = [t for t in BACKEND_TUNABLES if t.split("=", 1)[0] not in present]
    merged = ":".join([tunables, *added] if tunables else added)
    return {"GLIBC_TUNABLES": merged} if merged else {}


def reexec_with_huge_pages() -> None:
    """Restart this interpreter with the same command line and the backend's tunables on, once;
    a no-op where they are on already, off by request, or the platform has no glibc tunables."""
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
