"""Crash injection for tests: kill this process at a named point of the publish protocol.

``SB_CRASH_AT=<name>`` makes the process SIGKILL itself when it reaches ``crash_point(name)``,
so tests can prove that a crash between any two steps loses nothing and doubles nothing.
Names in use: ``after_segments``, ``after_manifest``, ``after_registry`` (publish) and
``before_commit`` (consumer).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV_VAR = "SB_CRASH_AT"


def crash_point(name: str) -> None:
    """Die here, without cleanup, if the environment asks for a crash at ``name``."""
    if os.environ.get(ENV_VAR) != name:
        return
    log.warning("crash injected at %s (%s)", name, ENV_VAR)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
