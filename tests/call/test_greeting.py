"""The agent speaks first (session.greeting): in a headless run, over WebRTC and over SIP,
as the first turn of the history, and the caller can talk over it."""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from agent.call.factory import SessionFactory
from signaling.headless import run_call
from signaling.server import create_app
from signaling.sip.endpoint import SipServer
from signaling.sip.phone import LoopbackPhone
from signaling.webrtc.loopback import Caller

pytestmark = pytest.mark.asyncio(loop_scope="session")
GREETING = "Hello! How can I help you today?"


@contextmanager
def histories(models):
    """The history of each Voxtral prompt built meanwhile, as (role, text, has audio)."""
    seen: list[list[tuple]] = []
    real = models.voxtral.reply_prompt

    def recording(audio, history, *args, **kwargs):
        seen.append([(t.role, t.text, t.audio is not None) for t in history])
        return real(audio, history, *args, **kwargs)

    models.voxtral.reply_prompt = recording
    try:
        yield seen
    finally:
        models.voxtral.reply_prompt = real


def silence(s):
    return np.zeros(int(16000 * s), dtype=np.int16)


@pytest.fixture
def greeting_settings(tiny_settings):
    # Short replies: the tiny model's speech is noise as long as max_tokens allows.
    return tiny_settings.replace("session", greeting=GREETING).replace("orpheus", max_tokens=140)


async def test_a_run_starts_with_the_greeting_and_it_is_the_first_turn_of_the_history(models, greeting_settings, speech):
    with histories(models) as seen:
        caller = np.concatenate([silence(8.0), speech[1], silence(5.0)])
        result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), greeting_settings, seed=1)
    greeting, answer = result.turns
    assert greeting.kind == "greeting" and greeting.index == 1 and answer.kind == "reply"
    assert greeting.played_text == GREETING and not greeting.interrupted
    assert greeting.agent_start is not None and greeting.agent_start < 2.0  # spoken at once
    assert answer.start > greeting.agent_end  # the caller spoke after it
    # Voxtral's history for the answer: the greeting as the agent's turn, no caller audio before it.
    assert seen == [[("assistant", GREETING, False)]]
    # The recording's agent channel holds speech from the start.
    agent = result.recording[:, 1]
    assert np.abs(agent[:24000 * 2]).max() > 0


async def test_the_caller_can_talk_over_the_greeting(models, greeting_settings, speech):
    settings = greeting_settings.replace("orpheus", max_tokens=700)  # a long greeting to cut
    caller = np.concatenate([silence(1.5), speech[1], silence(5.0)])
    result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), settings, seed=2)
    greeting = result.turns[0]
    assert greeting.kind == "greeting" and greeting.interrupted
    assert greeting.agent_end is not None and greeting.agent_end < 1.5 + len(speech[1]) / 16000
    assert len(result.turns) == 2 and result.turns[1].reply_text  # and the caller is answered


async def test_no_greeting_by_default(models, tiny_settings, speech):
    caller = np.concatenate([silence(3.0), speech[1], silence(5.0)])
    result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), tiny_settings, seed=3)
    assert len(result.turns) == 1 and result.turns[0].kind == "reply"
    assert result.turns[0].agent_start > 3.0


async def test_a_webrtc_caller_hears_the_greeting_without_saying_anything(models, greeting_settings):
    server = TestServer(create_app(SessionFactory(models), greeting_settings), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            caller = Caller(str(server.make_url("")))
            await caller.dial(http)
            await caller.wait_for(lambda: bool(caller.loud_since(0)), timeout=30)
            await caller.wait_for(lambda: any(m["type"] == "turn" for m in caller.messages), timeout=30)
            turn = next(m for m in caller.messages if m["type"] == "turn")
            assert turn["turn"] == 1 and turn["reply"] == GREETING
            await caller.pc.close()
    finally:
        await server.close()


async def test_a_phone_caller_hears_the_greeting_once_the_ack_came(models, greeting_settings):
    server = SipServer(SessionFactory(models), greeting_settings, "127.0.0.1", 0)
    await server.start()
    phone = LoopbackPhone("127.0.0.1", server.port, call_id="greeting-call")
    try:
        await phone.dial()
        dialled = time.monotonic()
        deadline = dialled + 30
        while not phone.loud_since(dialled) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert phone.loud_since(dialled), "no greeting heard"
        call = server.calls["greeting-call"]
        assert call.session is not None and call.session.turns[0].kind == "greeting"
    finally:
        await phone.hang_up()
        await server.close()


# -- an idle caller ----------------------------------------------------------------

async def test_an_idle_caller_is_asked_then_hung_up_on(models, tiny_settings, speech):
    settings = tiny_settings.replace("orpheus", max_tokens=140).replace(
        "session", idle_prompt="Are you still there?", idle_prompt_s=3.0, idle_hangup_s=8.0)
    with histories(models) as seen:
        # A question, then silence far longer than the hang-up: the run ends at the hang-up.
        caller = np.concatenate([silence(0.5), speech[1], silence(60.0)])
        result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), settings, seed=4)
    answer, prompt = result.turns
    assert answer.kind == "reply" and prompt.kind == "idle_prompt" and prompt.played_text == "Are you still there?"
    assert answer.agent_end is not None and prompt.agent_start is not None
    assert prompt.t_decision - answer.agent_end == pytest.approx(3.0, abs=0.1)  # then TTS speaks it
    # Hung up 8 s after the answer ended: the run stopped there, not at the recording's end.
    assert len(result.recording) / 24000 == pytest.approx(answer.agent_end + 8.0, abs=0.3)
    assert seen == [[]]  # nobody asked Voxtral anything after the first question


async def test_a_caller_who_answers_the_prompt_is_not_hung_up_on(models, tiny_settings, speech):
    settings = tiny_settings.replace("orpheus", max_tokens=140).replace(
        "session", idle_prompt_s=3.0, idle_hangup_s=12.0)
    with histories(models) as seen:
        # Answer the prompt 9 s after the question (the prompt is over by then), then stay
        # silent: the idle clock starts over after the second reply.
        caller = np.concatenate([silence(0.5), speech[1], silence(9.0), speech[0], silence(40.0)])
        result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), settings, seed=5)
    kinds = [t.kind for t in result.turns]
    assert kinds[:3] == ["reply", "idle_prompt", "reply"], kinds
    # The second reply's history holds the prompt as the agent's words after its answer.
    assert seen[1][-1][0] == "assistant" and seen[1][-1][1].endswith("Are you still there?")
    last_reply = result.turns[2]
    assert len(result.recording) / 24000 > last_reply.agent_end + 11.5  # hung up 12 s after it, not sooner


@pytest.mark.asyncio(loop_scope="session")
async def test_the_hang_up_must_come_after_the_prompt():
    from agent.config import load_settings
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match="session.idle_hangup_s"):
        load_settings("tiny", env={"VOICE_AGENT_SESSION__IDLE_PROMPT_S": "10", "VOICE_AGENT_SESSION__IDLE_HANGUP_S": "5"})


async def test_a_phone_caller_who_says_nothing_gets_a_bye(models, tiny_settings):
    settings = tiny_settings.replace("orpheus", max_tokens=140).replace(
        "session", greeting="Hi.", idle_prompt_s=0.0, idle_hangup_s=2.0)
    server = SipServer(SessionFactory(models), settings, "127.0.0.1", 0)
    await server.start()
    phone = LoopbackPhone("127.0.0.1", server.port, call_id="idle-call")
    try:
        await phone.dial()
        call = server.calls["idle-call"]
        deadline = time.monotonic() + 30
        while not call.ended and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert call.ended and call.end_reason == "agent hung up: idle caller"
        # The phone got the agent's BYE (this test phone never answers it).
        bye = await asyncio.wait_for(phone._replies.get(), 5)
        assert bye.method == "BYE" and bye.header("Call-ID") == "idle-call"
    finally:
        await phone.hang_up()
        await server.close()


async def test_a_webrtc_caller_who_says_nothing_is_hung_up_on(models, tiny_settings):
    from signaling.server import CALLS

    settings = tiny_settings.replace("orpheus", max_tokens=140).replace(
        "session", greeting="Hi.", idle_hangup_s=2.0)
    server = TestServer(create_app(SessionFactory(models), settings), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            caller = Caller(str(server.make_url("")))
            await caller.dial(http)
            calls = server.app[CALLS]
            call = calls[caller.call_id]
            await caller.wait_for(lambda: caller.call_id not in calls, timeout=30)
            assert call.end_reason == "agent hung up: idle caller"
            assert any(m["type"] == "hangup" and m["reason"] == "idle caller" for m in caller.messages)
            await caller.pc.close()
    finally:
        await server.close()
