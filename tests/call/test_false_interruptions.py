"""False interruptions: a short sound while the agent speaks holds its audio and lets it
play on; speech past session.barge_in_ms is a barge-in (tests/call/test_session.py has
the barge-in itself)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.call.events import AgentInterrupted, AgentPaused, AgentResumed
from tests.call.test_session import converse


@pytest.fixture
def long_reply(tiny_settings):
    # Several sentences of noise from the tiny model: long enough to talk over.
    return tiny_settings.replace("voxtral", max_new_tokens=24).replace("orpheus", max_tokens=280)


def cough(speech: np.ndarray) -> np.ndarray:
    """About 0.35 s of speech: enough for the VAD to start (200 ms), short of a barge-in."""
    loud = np.nonzero(np.abs(speech) > 1000)[0][0]
    return speech[loud:loud + int(0.35 * 16000)]


async def test_a_short_sound_pauses_the_agent_and_it_plays_on(models, long_reply, speech):
    session, agent, spoke_again, events = await converse(models, long_reply, speech[0], cough(speech[1]),
                                                         cut_after_frames=10)
    first = session.turns[0]
    assert not first.interrupted and first.error is None
    paused = [e for e in events if isinstance(e, AgentPaused)]
    resumed = [e for e in events if isinstance(e, AgentResumed)]
    assert len(paused) == 1 and len(resumed) == 1 and not any(isinstance(e, AgentInterrupted) for e in events)
    s = long_reply.session
    assert 0 < resumed[0].paused_s < (350 + s.resume_after_ms + 300) / 1000
    # The agent was silent while held, then played the rest of its reply: every frame made.
    held = [f for f in agent[spoke_again:] if f is None]
    assert len(held) >= 5
    # (A frame may straddle two segments, and the last is padded: count the reply whole.)
    assert sum(seg.played for seg in first.segments) >= sum(seg.produced for seg in first.segments) > 0
    assert first.played_text == " ".join(seg.text for seg in first.segments)
    # The sound was no turn of its own.
    assert len(session.turns) == 1


async def test_speech_past_barge_in_ms_cuts_the_reply(models, long_reply, speech):
    session, agent, spoke_again, events = await converse(models, long_reply, speech[0], speech[1],
                                                         cut_after_frames=10)
    kinds = [type(e) for e in events]
    assert AgentPaused in kinds and AgentInterrupted in kinds and AgentResumed not in kinds
    assert kinds.index(AgentPaused) < kinds.index(AgentInterrupted)
    assert session.turns[0].interrupted and len(session.turns) == 2


async def test_barge_in_ms_at_the_start_window_cuts_at_once(models, long_reply, speech):
    settings = long_reply.replace("session", barge_in_ms=0)
    session, agent, spoke_again, events = await converse(models, settings, speech[0], cough(speech[1]),
                                                         cut_after_frames=10)
    kinds = [type(e) for e in events]
    assert AgentInterrupted in kinds and AgentPaused not in kinds  # as before false-interruption handling
    assert session.turns[0].interrupted
