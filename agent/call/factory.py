"""What a transport needs of the agent, and nothing more: whether it can take calls now,
a new CallSession for each call, and the models' state for health and metrics.

Transports (signaling/) are given a SessionFactory by the composition root (agent/cli.py)
rather than the model manager, so that they move audio and never touch a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.call.session import CallSession
from agent.config import Settings
from agent.models.manager import UnifiedModelManager


class SessionFactory:
    """New call sessions on one process's models."""

    def __init__(self, models: UnifiedModelManager) -> None:
        self._models = models

    @property
    def ready(self) -> bool:
        """The models are loaded: calls can be answered."""
        return self._models.ready

    @property
    def loaded(self) -> dict[str, bool]:
        """Which models are loaded so far (for /health while they load)."""
        return self._models.loaded

    @property
    def device(self) -> str:
        return str(self._models.device)

    def memory_stats(self) -> dict[str, float]:
        """The device's memory in MiB, by kind (for /metrics)."""
        return self._models.memory.stats()

    def new_session(self, settings: Settings | None = None, *, voice: str | None = None, echo_guard: bool = False,
                    clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> CallSession:
        """A CallSession for a new call (inside a running event loop). `echo_guard`: the
        transport brings the agent's own voice back (a phone line). InputError for an
        unknown voice."""
        return CallSession(self._models, settings, clock=clock, voice=voice, seed=seed, echo_guard=echo_guard)
