"""What is kept of each call once it ends: its record (who called, how it went, why it
ended, every turn) and where its recording is.

One `CallRecords` per process holds the newest records.keep records in memory (for
GET /calls) and appends each to records.path as one JSON line, flushed when the call
ends, so a crash can cut no line but the one being written. Recordings go into
records.audio_dir, named by the call's id; an id is ours (never a peer's Call-ID) and is
checked, so no name can reach outside that folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import RecordsSettings
from agent.errors import InputError

if TYPE_CHECKING:
    from agent.call.session import CallSession

log = logging.getLogger(__name__)

CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Who ended a call: the caller (hung up, pressed the hang-up key, stopped sending), the
# agent (an idle caller), the server (an operator's DELETE, shutdown), the network (no
# media, never connected) or an error.
ENDED_BY = ("caller", "agent", "server", "network", "error")


@dataclass
class CallRecord:
    """One finished call."""
    id: str
    transport: str  # "webrtc", "sip-in", "sip-out", "headless"
    party: dict[str, Any]  # the other side: SIP From/To/Call-ID and address, a browser's address
    started_at: float  # Unix time
    ended_at: float
    ended_by: str  # one of ENDED_BY
    end_reason: str
    turns: list[dict[str, Any]] = field(default_factory=list)
    dtmf: list[dict[str, Any]] = field(default_factory=list)
    audio: str | None = None  # the recording's path

    @classmethod
    def of(cls, session: CallSession, transport: str, party: dict[str, Any], ended_by: str,
           end_reason: str) -> CallRecord:
        """The record of a closed session. Its end is timed on the session's clock, which
        for `voice-agent run` skips the caller's silences."""
        if ended_by not in ENDED_BY:
            raise ValueError(f"ended_by must be one of {ENDED_BY}, got {ended_by!r}")
        recording = session.recording
        return cls(id=session.call_id, transport=transport, party=party, started_at=session.started_at,
                   ended_at=session.started_at + session.now(), ended_by=ended_by, end_reason=end_reason,
                   turns=[t.to_dict() for t in session.turns],
                   dtmf=[{"digit": d.digit, "t": round(d.t, 3)} for d in session.dtmf],
                   audio=str(recording.path) if recording is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "transport": self.transport, "party": self.party,
                "started_at": _iso(self.started_at), "ended_at": _iso(self.ended_at),
                "duration_s": round(self.ended_at - self.started_at, 3),
                "ended_by": self.ended_by, "end_reason": self.end_reason,
                "turns": self.turns, "dtmf": self.dtmf, "audio": self.audio}


class CallRecords:
    """The process's call records (see the module's docstring)."""

    def __init__(self, settings: RecordsSettings) -> None:
        self.settings = settings
        self._recent: deque[CallRecord] = deque(maxlen=settings.keep)
        self.path = Path(settings.path) if settings.path else None
        self.audio_dir = Path(settings.audio_dir) if settings.audio else None
        self.written = 0
        self.failures = 0

    def check(self) -> None:
        """Make the folders the records and recordings go in; InputError (one line) when
        they cannot be written, so that a bad setting stops the start, not a call."""
        for folder, what in ((self.path.parent if self.path else None, "records.path"),
                             (self.audio_dir, "records.audio_dir")):
            if folder is None:
                continue
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"{what}: cannot make {str(folder)!r}: {e.strerror or e}") from e
            if not os.access(folder, os.W_OK):
                raise InputError(f"{what}: {str(folder)!r} is not writable")

    def recording_path(self, call_id: str) -> Path | None:
        """Where the call's recording goes (None: records.audio is off)."""
        if self.audio_dir is None:
            return None
        if not CALL_ID.fullmatch(call_id):
            raise ValueError(f"not a call id: {call_id!r}")
        root = self.audio_dir.resolve()
        path = (root / f"{call_id}.wav").resolve()
        if path.parent != root:  # the pattern already forbids it: a second lock on the door
            raise ValueError(f"not a call id: {call_id!r}")
        return path

    def add(self, record: CallRecord) -> None:
        """Keep a finished call's record, and append it to records.path. A write that fails
        is logged (the record stays in memory); the call is over either way."""
        self._recent.append(record)
        if self.path is None:
            return
        line = json.dumps(record.to_dict(), ensure_ascii=False) + "\n"
        try:
            # One write of the whole line on an O_APPEND descriptor: lines from calls that
            # end together never interleave, and a crash cuts at most this one.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            self.written += 1
        except OSError as e:
            self.failures += 1
            log.error("call %s: cannot append its record to %s: %s", record.id, self.path, e.strerror or e)

    def recent(self, limit: int | None = None) -> list[CallRecord]:
        """The newest records first."""
        newest = list(reversed(self._recent))
        return newest if limit is None else newest[:limit]

    def get(self, call_id: str) -> CallRecord | None:
        return next((r for r in reversed(self._recent) if r.id == call_id), None)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
