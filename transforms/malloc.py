"""A fixed mmap threshold for glibc's malloc in batch processes: the backtest's peak memory.

glibc serves a request of at least its *mmap threshold* with a mapping of its
own, given back to the system when freed; smaller requests come from heaps
it keeps. The threshold starts at 128 KiB and, by default, moves: each time a
mapped block is freed, the threshold rises to that block's size, up to
32 MiB on 64-bit (mallopt(3), ``M_MMAP_THRESHOLD``). A backtest allocates
and frees large blocks all the time (byte strings of elements on the
runner's data channel, de-duplication's compressed packs, the fold's dicts
of partial accumulators as they grow; not broken down by source). Once the
threshold has risen, such blocks come from the heaps, between long-lived
small objects, and a heap cannot give back freed space below a block still
in use. Setting the threshold at all turns the adjustment off.

On the 1M-signal benchmark input with two worker processes, six runs each
alternating, the process tree's peak RSS was 1,734 MiB (median) with
glibc's default and 1,340 MiB with the threshold fixed at 1 MiB, the
runner's process and both workers each holding less. The price: mapping
and unmapping blocks doubled the page faults, and the run took about 4%
more CPU (benchmarks/README.md, change 24). The backtest fixes it unless
told ``--mmap_threshold=moving``.

A process's own threshold is fixed with ``mallopt``, for the rest of its
life. Processes it starts get glibc's variable, which glibc reads when a
process starts, so the local runner's worker processes have the setting
from their first allocation. Dataflow's workers are not started from here
and keep glibc's default: not measured there.

Only on Linux with glibc; elsewhere these do nothing. A threshold set with
glibc's ``MALLOC_MMAP_THRESHOLD_`` variable stands: nothing here changes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

__all__ = ["ENV_VAR", "MMAP_THRESHOLD_BYTES", "fix_mmap_threshold", "mmap_threshold_for_children"]

# glibc's own variable for the threshold, read once as a process starts.
ENV_VAR = "MALLOC_MMAP_THRESHOLD_"
# 128 KiB, 256 KiB, 1 MiB and 4 MiB gave the same peaks within the runs' spread (16 MiB about 100 MiB more):
# 1 MiB is the one the A/B runs measured for speed (benchmarks/README.md, change 24).
MMAP_THRESHOLD_BYTES = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's <malloc.h>


def _mallopt():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running program's symbols, libc's among them
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def fix_mmap_threshold(environ=os.environ) -> bool:
    """Fix this process's mmap threshold at ``MMAP_THRESHOLD_BYTES``; True if it was set by this call.

    Not where ``environ`` (the process's own) has ``ENV_VAR``: glibc applied the user's value at start.
    Calling it again does no harm.
    """
    if ENV_VAR in environ:
        return False
    mallopt = _mallopt()
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


@contextlib.contextmanager
def mmap_threshold_for_children(environ=os.environ):
    """While open, processes started from this one (the local runner's workers) fix their threshold too:
    ``ENV_VAR`` is in ``environ``, unless it was there already or there is no glibc to read it."""
    if ENV_VAR in environ or _mallopt() is None:
        yield
        return
    environ[ENV_VAR] = str(MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        environ.pop(ENV_VAR, None)
