"""Process-wide settings every command starts with."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt's parameter number for the maximum count of malloc arenas (glibc's M_ARENA_MAX).
_M_ARENA_MAX = -8
_ARENAS = 2


def bound_malloc_arenas() -> None:
    """Let glibc keep at most two malloc arenas in this process.

    By default every thread that allocates gets an arena of its own, up to eight per core:
    the consumer's publisher and upload threads and librdkafka's each fragment one, which
    measured about 20 MB of resident memory the process no longer held. Elsewhere than
    glibc this does nothing.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    if mallopt(_M_ARENA_MAX, _ARENAS) != 1:
        log.debug("mallopt(M_ARENA_MAX) was refused; malloc arenas stay unbounded")
