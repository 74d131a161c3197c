"""A fixed mmap threshold for glibc's malloc in batch processes: the backtest's peak memory.

glibc serves a request of at least its *mmap threshold* with a mapping of its
own, given back to the system when freed; smaller requests come from heaps
it keeps. The threshold starts at 128 KiB and, by default, moves: each time a
mapped block is freed, the threshold rises to that block's size, up to
32 MiB on 64-bit, and the *trim threshold*, the free space at a heap's top
that glibc keeps rather than give back, rises to twice that (mallopt(3),
``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``). A backtest allocates
and frees large blocks all the time (byte strings of elements on the
runner's data channel, de-duplication's compressed packs, the fold's dicts
of partial accumulators as they grow; not broken down by source). Once the
threshold has risen, such blocks come from the heaps, between long-lived
small objects, and a heap cannot give back freed space below a block still
in use. Setting the threshold at all turns the adjustment off; the trim
threshold is set back to glibc's starting 128 KiB with it, as a process
that starts with the threshold fixed has it.

On the 1M-signal benchmark input with two worker processes, six runs each
alternating, the process tree's peak RSS was 1,734 MiB (median) with
glibc's default and 1,340 MiB with the threshold fixed at 1 MiB, the
runner's process and both workers each holding less. The price: mapping
and unmapping blocks doubled the page faults, and the run took about 4%
more CPU (benchmarks/README.md, change 24). The backtest fixes it unless
told ``--mmap_threshold=moving``.

A process's own thresholds are set with ``mallopt``, for the rest of its
life: a later backtest in the same process told ``--mmap_threshold=moving``
finds them fixed. Processes it starts get glibc's variable, which glibc
reads when a process starts, so the local runner's worker processes have
the setting from their first allocation. Dataflow's workers are not started
from here and keep glibc's default: not measured there. The variable is in
the process's environment only while a backtest runs, so two backtests run
at once from one process are not supported (nothing here does that).

Only on Linux with glibc; elsewhere these do nothing. Nor do they where the
user has set glibc's thresholds (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, or either in ``GLIBC_TUNABLES``): those stand.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

__all__ = [
    "ENV_VAR",
    "MMAP_THRESHOLD_BYTES",
    "TRIM_THRESHOLD_BYTES",
    "fix_mmap_threshold",
    "mmap_threshold_for_children",
    "users_own",
]

# glibc's own variable for the threshold, read once as a process starts.
ENV_VAR = "MALLOC_MMAP_THRESHOLD_"
# 128 KiB, 256 KiB, 1 MiB and 4 MiB gave the same peaks within the runs' spread (16 MiB about 100 MiB more):
# 1 MiB is the one the A/B runs measured for speed (benchmarks/README.md, change 24).
MMAP_THRESHOLD_BYTES = 1024 * 1024
# What glibc starts with: a heap keeps at most this much free space at its top before giving it back.
TRIM_THRESHOLD_BYTES = 128 * 1024
# mallopt's parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# How a user sets the thresholds themselves: glibc's variables, and its tunables (read at start).
_USERS_VARIABLES = (ENV_VAR, "MALLOC_TRIM_THRESHOLD_")
_USERS_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


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


def users_own(environ=os.environ) -> bool:
    """Whether ``environ`` sets glibc's thresholds itself (module docstring), which then stand."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(name in environ for name in _USERS_VARIABLES) or any(t in tunables for t in _USERS_TUNABLES)


def fix_mmap_threshold(environ=os.environ) -> bool:
    """Fix this process's mmap threshold at ``MMAP_THRESHOLD_BYTES``, and its trim threshold at glibc's
    starting value (which a moving threshold may have raised); True if this call set them.

    Not where ``environ``, the process's own, sets the thresholds (``users_own``): glibc applied the
    user's values when the process started. Calling it again does no harm.
    """
    if users_own(environ):
        return False
    mallopt = _mallopt()
    return (
        mallopt is not None
        and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )


@contextlib.contextmanager
def mmap_threshold_for_children(environ=os.environ):
    """While open, processes started from this one (the local runner's workers) fix their threshold too:
    ``ENV_VAR`` is in ``environ``, unless the user set the thresholds (``users_own``) or there is no glibc
    to read it."""
    if users_own(environ) or _mallopt() is None:
        yield
        return
    environ[ENV_VAR] = str(MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        environ.pop(ENV_VAR, None)
