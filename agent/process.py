"""Process-wide set-up for a long-running agent, done once by the command line before any
thread starts."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
MALLOC_ARENAS = 2


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
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        applied = bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        applied = False
    if not applied:
        log.debug("malloc arenas not limited (no glibc mallopt)")
    return applied
