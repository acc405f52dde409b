"""Process-wide set-up for a long-running agent, done once by the command line before any
thread starts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import os
import time

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
MALLOC_ARENAS = 2
TRIM_AFTER_S = 1.0  # after a call ends: its session and media objects are gone by then


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Let glibc's malloc keep at most `arenas` arenas (its default: 8 per core).

    A serving process allocates from many threads (the event loop, the device thread, the
    worker threads that build prompts, aiortc's and PyAV's), and glibc gives threads that
    meet contention arenas of their own. Each call's short-lived buffers then leave free
    but unreturnable holes in several arenas, and the resident memory climbs in steps for
    the first hundred or more calls: 0.69 MiB a call over calls 40-300 of a WebRTC soak,
    against 0.10 MiB with two arenas, which also ended 200 MiB lower (bench/RESULTS.md).
    The soak's calls took as long either way; the models' speed with the limit is not
    benchmarked yet. Leaves a MALLOC_ARENA_MAX the user set alone. Returns whether the
    limit was applied."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    try:
        applied = libc is not None and bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        applied = False
    if not applied:
        log.debug("malloc arenas not limited (no glibc mallopt)")
    return applied


class MemoryTrimmer:
    """Hands the heap pages a finished call freed back to the system.

    glibc keeps freed pages inside its heaps and returns only the top of each, so a call's
    buffers freed below live data stay resident: RSS then moves in 30-60 MiB steps over
    hundreds of calls (bench/RESULTS.md). `malloc_trim(0)` releases every free page of
    every arena. It runs on a thread of its own (made at the first trim, one for the
    process) `TRIM_AFTER_S` after a call ends (the allocator's locks, not the GIL, are held
    meanwhile), and calls that end close together share one trim. Does nothing where
    malloc_trim is missing (not glibc)."""

    def __init__(self, delay_s: float = TRIM_AFTER_S) -> None:
        libc = _libc()
        self._trim = getattr(libc, "malloc_trim", None) if libc is not None else None
        self.delay_s = delay_s
        self.trims = 0
        self._pending: asyncio.TimerHandle | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def trim_now(self) -> bool:
        """Trim at once on this thread; True when memory was returned."""
        if self._trim is None:
            return False
        start = time.perf_counter()
        released = bool(self._trim(0))
        self.trims += 1
        log.debug("malloc_trim: %s in %.1f ms", "released" if released else "nothing", (time.perf_counter() - start) * 1000)
        return released

    def soon(self) -> None:
        """Trim once, `delay_s` from now, off the event loop (call from the loop)."""
        if self._trim is None or self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(self.delay_s, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = None
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="malloc-trim")
        loop.run_in_executor(self._thread, self.trim_now)
