"""Whether glibc maps a 2 MiB block on its own after an 8 MiB mapping was freed (tests/transforms/test_malloc.py).

With glibc's moving mmap threshold it does not: freeing the 8 MiB mapping raised the threshold past 2 MiB,
so the block comes from a heap. With the threshold fixed at 1 MiB (transforms.malloc) it does. Importable
by the local runner's worker processes, and meant for a process whose malloc the test controls.
"""

from __future__ import annotations

import ctypes
import os


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


def _libc():
    """glibc's mallinfo2, malloc and free, typed."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    return libc


def block_is_mapped() -> bool:
    libc = _libc()
    freed = bytearray(8 << 20)  # mapped: over glibc's starting threshold, 128 KiB
    del freed  # with the moving threshold, glibc now maps only blocks over 8 MiB
    before = libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own
    block = bytearray(2 << 20)
    mapped = libc.mallinfo2().hblkhd - before >= len(block)
    del block
    return mapped


def in_worker(_) -> str:
    """For a Beam step: this process's id and the probe's answer, as a line."""
    return f"{os.getpid()} {block_is_mapped()}"


def heap_kept_after_freeing(total: int = 12 << 20, block: int = 64 << 10) -> int:
    """Bytes glibc's main heap still holds after ``total`` bytes of ``block``-sized allocations (under any
    mmap threshold here, so from the heap) are freed: the free space at its top it kept rather than trim."""
    libc = _libc()
    blocks = [libc.malloc(block) for _ in range(total // block)]
    for pointer in blocks:
        libc.free(pointer)
    return libc.mallinfo2().arena


def raise_moving_threshold() -> None:
    """Map and free an 8 MiB block: glibc's moving mmap threshold rises to 8 MiB and its trim threshold to
    16 MiB."""
    libc = _libc()
    libc.free(libc.malloc(8 << 20))
