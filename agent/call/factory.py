"""What a transport needs of the agent, and nothing more: whether it can take calls now,
a new CallSession for each call, and the models' state for health and metrics.

Transports (signaling/) are given a SessionFactory by the composition root (agent/cli.py)
rather than the model manager, so that they move audio and never touch a model.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.call.recording import CallRecording
from agent.call.records import CallRecord, CallRecords
from agent.call.session import CallSession
from agent.config import Settings
from agent.models.manager import UnifiedModelManager

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


class SessionFactory:
    """New call sessions on one process's models."""

    def __init__(self, models: UnifiedModelManager, records: CallRecords | None = None,
                 tracer: Tracer | None = None) -> None:
        """`records`: the process's (made from the settings by default); `tracer`:
        OpenTelemetry's (the process's by default)."""
        self._models = models
        self.records = records if records is not None else CallRecords(models.settings.records)
        self.tracer = tracer

    @property
    def ready(self) -> bool:
        """The models are loaded: calls can be answered."""
        return self._models.ready

    @property
    def loaded(self) -> dict[str, bool]:
        """Which models are loaded so far (for /health while they load)."""
        return self._models.loaded

    def free_engine_slots(self) -> dict[str, int | None]:
        """The batched engines' free slots (for /ready)."""
        return self._models.free_engine_slots()

    @property
    def device(self) -> str:
        return str(self._models.device)

    def memory_stats(self) -> dict[str, float]:
        """The device's memory in MiB, by kind (for /metrics)."""
        return self._models.memory.stats()

    def new_session(self, settings: Settings | None = None, *, voice: str | None = None, echo_guard: bool = False,
                    clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                    call_id: str | None = None) -> CallSession:
        """A CallSession for a new call (inside a running event loop). `echo_guard`: the
        transport brings the agent's own voice back (a phone line). `call_id`: the
        transport's own id for the call (made here without one); with records.audio the
        session records the call under it. InputError for an unknown voice."""
        call_id = call_id or uuid.uuid4().hex[:12]
        path = self.records.recording_path(call_id)
        self._models.validate_voice(voice or (settings or self._models.settings).session.voice or None)
        recording = CallRecording(path) if path is not None else None
        return CallSession(self._models, settings, clock=clock, voice=voice, seed=seed, echo_guard=echo_guard,
                           call_id=call_id, recording=recording, tracer=self.tracer)

    def finish(self, session: CallSession, transport: str, party: dict[str, Any], ended_by: str,
               end_reason: str) -> CallRecord:
        """Keep the record of a call whose session is closed (see agent/call/records.py)."""
        record = CallRecord.of(session, transport, party, ended_by, end_reason)
        self.records.add(record)
        session.trace.end(record.ended_at, transport, ended_by, end_reason, len(record.turns))
        return record
