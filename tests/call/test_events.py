"""The session events and their one rendering for the outside (agent/call/events.py)."""

import json
import typing

import pytest

from agent.call import events
from agent.call.events import (
    AgentHungUp,
    AgentInterrupted,
    AgentPaused,
    AgentReplyText,
    AgentResumed,
    CallerSpeechStarted,
    CallerSpeechStopped,
    CallerTranscript,
    CallTransferred,
    DtmfReceived,
    TurnFailed,
    TurnFinished,
    TurnRecord,
    event_line,
    event_message,
)

RECORD = TurnRecord(index=2, start=1.0, end=2.5, decided_at=3.0, played_text="Hello there.")
ONE_OF_EACH = [CallerSpeechStarted(1.23456), CallerSpeechStopped(2.5, 1.25), AgentReplyText(2, "Hello there."),
               AgentInterrupted(2, "Hello", 12), TurnFinished(RECORD), TurnFailed(3, "RuntimeError: boom"),
               DtmfReceived("5", 4.0), AgentPaused(2, 5.0), AgentResumed(2, 5.5, 0.5), AgentHungUp("idle caller", 9.0),
               CallerTranscript(2, "What time is it?"), CallTransferred("sip:desk@pbx", False, "486 Busy Here", 9.5)]


def test_every_session_event_has_a_message():
    assert {type(e) for e in ONE_OF_EACH} == set(typing.get_args(events.SessionEvent))
    messages = [event_message(e) for e in ONE_OF_EACH]
    assert [m["type"] for m in messages] == ["speech_started", "speech_stopped", "reply_text", "interrupted", "turn",
                                            "turn_failed", "dtmf", "paused", "resumed", "hangup",
                                            "transcript", "transferred"]
    assert messages[0] == {"type": "speech_started", "t": 1.235}
    assert messages[4]["reply"] == "Hello there." and messages[4]["turn"] == 2
    assert messages[-2] == {"type": "transcript", "turn": 2, "text": "What time is it?"}
    assert messages[-1] == {"type": "transferred", "to": "sip:desk@pbx", "ok": False, "status": "486 Busy Here",
                            "t": 9.5}
    json.dumps(messages)  # every message is JSON as it is


def test_not_an_event_is_refused():
    with pytest.raises(TypeError):
        event_message(RECORD)


def test_lines_for_a_terminal():
    assert event_line(TurnFinished(RECORD)) == "turn 2: caller 1.00-2.50 s, agent said: 'Hello there.'"
    assert event_line(DtmfReceived("#", 1.5)) == "DTMF # at 1.50 s"
    assert event_line(CallerSpeechStarted(0.1)) is None
    assert event_line(AgentHungUp("idle caller", 9.0)) == "the agent hung up at 9.00 s: idle caller"
    assert event_line(CallerTranscript(2, "What time is it?")) == "turn 2: caller said: 'What time is it?'"
