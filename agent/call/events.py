"""What a call's session tells its transport, one way: the session events (in the order
they happen), and the record of each turn (its reply, what of it was heard, its latencies)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CallerSpeechStarted:
    """The caller started speaking (the VAD heard speech)."""
    t: float


@dataclass(frozen=True)
class CallerSpeechStopped:
    """The caller's utterance ended; a reply to it starts."""
    t: float
    duration_s: float


@dataclass(frozen=True)
class CallerTranscript:
    """What the caller said in a turn, as Voxtral's transcription mode wrote it (written
    after the turn's reply started, so it may come after the reply's events)."""
    turn: int
    text: str


@dataclass(frozen=True)
class AgentReplyText:
    """A piece of the agent's reply text, as it is generated."""
    turn: int
    text: str  # a clause or sentence handed to TTS


@dataclass(frozen=True)
class AgentInterrupted:
    """The caller barged in: the agent's reply was cut where it was heard."""
    turn: int
    played_text: str
    dropped_frames: int


@dataclass(frozen=True)
class AgentPaused:
    """The caller made a sound while the agent spoke: its audio is held where it was,
    until the sound proves an interruption (session.barge_in_ms of speech: AgentInterrupted)
    or ends (AgentResumed)."""
    turn: int
    t: float


@dataclass(frozen=True)
class AgentResumed:
    """The caller's sound was short (a cough, an "mhm"): the agent plays on where it paused."""
    turn: int
    t: float
    paused_s: float


@dataclass(frozen=True)
class TurnFinished:
    """A turn is over; its record has the reply as heard and its latencies."""
    turn: TurnRecord


@dataclass(frozen=True)
class TurnFailed:
    """A turn's reply failed; the call goes on."""
    turn: int
    error: str


@dataclass(frozen=True)
class AgentHungUp:
    """The agent ended the call itself (the caller stayed silent for session.idle_hangup_s);
    the transport hangs up (SIP BYE, WebRTC closed, `run` finishes)."""
    reason: str
    t: float


@dataclass(frozen=True)
class CallTransferred:
    """The agent handed the call on (SIP REFER): `ok` when the transfer target answered
    (the agent then hangs up), else `status` says why not and the call goes on."""
    to: str
    ok: bool
    status: str
    t: float


@dataclass(frozen=True)
class DtmfReceived:
    """The caller pressed a key (RFC 4733 telephone-event)."""
    digit: str  # 0-9, *, #, A-D
    t: float


SessionEvent = (CallerSpeechStarted | CallerSpeechStopped | CallerTranscript | AgentReplyText | AgentInterrupted | AgentPaused
                | AgentResumed | TurnFinished | TurnFailed | DtmfReceived | AgentHungUp | CallTransferred)


def event_message(event: SessionEvent) -> dict[str, Any]:
    """A session event as JSON-ready data, {"type": ..., ...}: the one rendering of the
    events for anyone outside the process (the web page's data channel)."""
    if isinstance(event, CallerSpeechStarted):
        return {"type": "speech_started", "t": round(event.t, 3)}
    if isinstance(event, CallerSpeechStopped):
        return {"type": "speech_stopped", "t": round(event.t, 3), "duration_s": round(event.duration_s, 3)}
    if isinstance(event, CallerTranscript):
        return {"type": "transcript", "turn": event.turn, "text": event.text}
    if isinstance(event, AgentReplyText):
        return {"type": "reply_text", "turn": event.turn, "text": event.text}
    if isinstance(event, AgentInterrupted):
        return {"type": "interrupted", "turn": event.turn, "heard": event.played_text}
    if isinstance(event, AgentPaused):
        return {"type": "paused", "turn": event.turn, "t": round(event.t, 3)}
    if isinstance(event, AgentResumed):
        return {"type": "resumed", "turn": event.turn, "t": round(event.t, 3), "paused_s": round(event.paused_s, 3)}
    if isinstance(event, TurnFinished):
        return {"type": "turn", "turn": event.turn.index, "reply": event.turn.played_text,
                "latency_ms": event.turn.latency_ms()}
    if isinstance(event, TurnFailed):
        return {"type": "turn_failed", "turn": event.turn, "error": event.error}
    if isinstance(event, DtmfReceived):
        return {"type": "dtmf", "digit": event.digit, "t": round(event.t, 3)}
    if isinstance(event, AgentHungUp):
        return {"type": "hangup", "reason": event.reason, "t": round(event.t, 3)}
    if isinstance(event, CallTransferred):
        return {"type": "transferred", "to": event.to, "ok": event.ok, "status": event.status, "t": round(event.t, 3)}
    raise TypeError(f"not a session event: {event!r}")


def event_line(event: SessionEvent) -> str | None:
    """A session event as one line for a person at a terminal (`voice-agent call`); None
    for the events too frequent to print (speech started and stopped, reply pieces)."""
    if isinstance(event, TurnFinished):
        t = event.turn
        return f"turn {t.index}: caller {t.start:.2f}-{t.end:.2f} s, agent said: {t.played_text!r}"
    if isinstance(event, CallerTranscript):
        return f"turn {event.turn}: caller said: {event.text!r}"
    if isinstance(event, AgentInterrupted):
        return f"turn {event.turn}: interrupted after {event.played_text!r}"
    if isinstance(event, TurnFailed):
        return f"turn {event.turn}: failed: {event.error}"
    if isinstance(event, DtmfReceived):
        return f"DTMF {event.digit} at {event.t:.2f} s"
    if isinstance(event, AgentHungUp):
        return f"the agent hung up at {event.t:.2f} s: {event.reason}"
    if isinstance(event, CallTransferred):
        return f"transfer to {event.to}: {'done' if event.ok else 'failed'} ({event.status})"
    return None


# -- turns -------------------------------------------------------------------------

@dataclass
class Segment:
    """One spoken piece of a reply, and how much of its audio was made and played."""
    text: str
    produced: int = 0  # samples made by TTS
    played: int = 0  # samples taken by the player


@dataclass
class TurnRecord:
    """One caller utterance and the agent's reply to it."""
    index: int
    start: float  # caller's utterance, session seconds
    end: float  # end of the last voiced frame
    decided_at: float
    segments: list[Segment] = field(default_factory=list)
    reply_text: str = ""
    interrupted: bool = False
    withdrawn: bool = False  # the caller went on before any of the reply was heard (not in the call's turns)
    preemptive: bool = False  # the reply was started at the pause, before the turn was decided
    # "reply" (to the caller's utterance), "greeting" (session.greeting, when the call was
    # answered), "idle_prompt" (session.idle_prompt, the caller silent) or "transfer_failed"
    # (session.transfer_failed): the last three have no caller audio of their own.
    kind: str = "reply"
    played_text: str | None = None  # set once known: the whole reply, or what was heard
    transcript: str | None = None  # the caller's words (records.transcribe), once written
    error: str | None = None
    # Session-clock times of the stages, and device time used, for the latency breakdown.
    t_decision: float = 0.0
    t_first_token: float | None = None
    t_first_tts_audio: float | None = None
    t_first_frame: float | None = None
    agent_start: float | None = None  # first and last frame taken by the player
    agent_end: float | None = None
    busy_at_decision: float = 0.0
    busy_at_first_frame: float | None = None

    def latency_ms(self) -> dict[str, float | None]:
        """From the end of the caller's speech (the last voiced frame) to each stage."""
        ms = lambda t: None if t is None else round((t - self.end) * 1000, 1)  # noqa: E731
        overhead = None
        # Not for a preemptive reply: its model work straddles the decision.
        if self.t_first_frame is not None and self.busy_at_first_frame is not None and not self.preemptive:
            span = self.t_first_frame - self.t_decision
            overhead = round((span - (self.busy_at_first_frame - self.busy_at_decision)) * 1000, 2)
        return {"vad": ms(self.t_decision), "first_token": ms(self.t_first_token),
                "first_tts_audio": ms(self.t_first_tts_audio), "first_frame_queued": ms(self.t_first_frame),
                "pipeline_overhead": overhead}

    def heard_text(self) -> str:
        """The reply as far as the caller heard it (word-level, by the share of audio played)."""
        words: list[str] = []
        for seg in self.segments:
            if seg.produced == 0 or seg.played == 0:
                break
            seg_words = seg.text.split()
            share = min(1.0, seg.played / seg.produced)
            words.extend(seg_words[:round(share * len(seg_words))])
            if share < 1.0:
                break
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        r = lambda t: None if t is None else round(t, 3)  # noqa: E731
        return {"index": self.index, "start": r(self.start), "end": r(self.end),
                "reply": self.played_text if self.played_text is not None else self.reply_text,
                "generated": self.reply_text, "interrupted": self.interrupted, "preemptive": self.preemptive,
                "kind": self.kind, "transcript": self.transcript,
                "error": self.error,
                "agent_start": r(self.agent_start), "agent_end": r(self.agent_end),
                "latency_ms": self.latency_ms()}


def summarize_turns(latencies: list[dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """p50 / p95 of each stage of the per-turn latency breakdowns of one call."""
    stages = sorted({k for d in latencies for k in d})
    out: dict[str, dict[str, float | None]] = {}
    for stage in stages:
        values = [v for d in latencies if (v := d.get(stage)) is not None]
        out[stage] = ({"p50": round(float(np.percentile(values, 50)), 2),
                       "p95": round(float(np.percentile(values, 95)), 2)} if values
                      else {"p50": None, "p95": None})
    return out
