"""`voice-agent run`: a recording plays the caller, through the same CallSession as live calls.

The recording is fed in 20 ms frames and the agent's audio is taken 20 ms at a time,
as a phone or browser would. By default time runs faster than real time while the
agent is idle and at real time while it thinks, speaks or decides whether a pause
ends the caller's turn, so every latency on the
output timeline is one the models really took; `realtime=True` paces the whole run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.call.events import TurnRecord
from agent.call.factory import SessionFactory
from agent.call.records import CallRecord
from agent.config import Settings
from agent.rates import IN_RATE, OUT_RATE
from signaling.pacing import PACKET_S

TAIL_LIMIT_S = 60.0  # most time the agent may keep talking after the recording ends


class VirtualClock:
    """Monotonic time that can jump ahead (while nothing depends on the wall clock)."""

    def __init__(self) -> None:
        self._origin = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self._origin

    def skip_to(self, t: float) -> None:
        ahead = t - self()
        if ahead > 0:
            self._origin -= ahead

    async def sleep_until(self, t: float) -> None:
        delay = t - self()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass
class CallResult:
    """What a headless call produced: its turns and the audio of both sides."""
    recording: np.ndarray | None  # (n, 2) int16 at 24 kHz: left the caller, right the agent (None: written out)
    turns: list[TurnRecord]
    input_s: float
    record: CallRecord


class RecordingSink(Protocol):
    """Where a headless call writes its stereo recording as it goes."""
    def write(self, samples: np.ndarray) -> None: ...


async def run_call(sessions: SessionFactory, caller_16k: np.ndarray, caller_24k: np.ndarray,
                   settings: Settings | None = None, realtime: bool = False, seed: int | None = None,
                   recording: RecordingSink | None = None, party: dict | None = None) -> CallResult:
    """Play `caller_16k` (int16 mono) into a session. The stereo call recording goes to
    `recording` 20 ms at a time as the call goes (a WavWriter: a long call holds none of
    it in memory); without one it is returned whole in the CallResult. The call's record
    (`party`: what was played, say the input file) is kept like a live call's."""
    clock = VirtualClock()
    session = sessions.new_session(settings, clock=clock, seed=seed)
    session.greet()  # the call is "answered" as the recording starts
    in_step = int(IN_RATE * PACKET_S)
    out_step = int(OUT_RATE * PACKET_S)
    n_in = -(-len(caller_16k) // in_step)
    silence_in = np.zeros(in_step, dtype=np.int16)
    blocks: list[np.ndarray] = []
    timeline = _Recording(caller_24k, out_step, recording.write if recording is not None else blocks.append)
    # Slot i of the timeline is [i, i + 1) x 20 ms. Caller frame i has fully arrived at
    # the end of its slot; the frame the player takes then plays in slot i + 1.
    agent = np.zeros(out_step, dtype=np.int16)  # what plays in slot i
    i = 0
    try:
        while True:
            t = (i + 1) * PACKET_S
            # Past the input, silence follows: it ends a turn the recording stops in the
            # middle of, then lets the answer play out.
            waiting = session.agent_busy or session.vad.in_speech
            if i >= n_in and (not waiting or t > n_in * PACKET_S + TAIL_LIMIT_S):
                break
            if session.ended.is_set():  # the agent hung up (an idle caller)
                break
            if realtime or session.agent_busy or session.deciding:  # the model's time is real time
                await clock.sleep_until(t)
            else:
                clock.skip_to(t)
            chunk = caller_16k[i * in_step:(i + 1) * in_step] if i < n_in else silence_in
            session.push_audio(chunk, IN_RATE)
            frame = session.outbound.get_nowait()
            timeline.slot(i, agent)
            agent = frame.samples if frame is not None else np.zeros(out_step, dtype=np.int16)
            await asyncio.sleep(0)  # let the session's tasks run
            i += 1
    finally:
        await session.close()
        ended_by, reason = (("agent", f"agent hung up: {session.end_reason}") if session.ended.is_set()
                            else ("caller", "the recording ended"))
        record = sessions.finish(session, "headless", party or {}, ended_by, reason)
    timeline.slot(i, agent)
    timeline.rest(i + 1)
    whole = np.concatenate(blocks) if recording is None else None
    return CallResult(whole, session.turns, len(caller_16k) / IN_RATE, record)


class _Recording:
    """The call recording, slot by slot: the caller's 24 kHz audio left, the agent's right."""

    def __init__(self, caller_24k: np.ndarray, step: int, write: Callable[[np.ndarray], None]) -> None:
        self.caller = caller_24k
        self.step = step
        self.write = write

    def slot(self, i: int, agent: np.ndarray) -> None:
        block = np.zeros((self.step, 2), dtype=np.int16)
        left = self.caller[i * self.step:(i + 1) * self.step]
        block[:len(left), 0] = left
        block[:len(agent), 1] = agent[:self.step]
        self.write(block)

    def rest(self, first_slot: int) -> None:
        """The caller's audio past the agent's last slot, if any (the agent silent)."""
        left = self.caller[first_slot * self.step:]
        if len(left):
            block = np.zeros((len(left), 2), dtype=np.int16)
            block[:, 0] = left
            self.write(block)
