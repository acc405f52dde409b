"""`voice-agent run`: a recording plays the caller, through the same CallSession as live calls.

The recording is fed in 20 ms frames and the agent's audio is taken 20 ms at a time,
as a phone or browser would. By default time runs faster than real time while the
agent is idle and at real time while it thinks or speaks, so every latency on the
output timeline is one the models really took; `realtime=True` paces the whole run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from .config import Settings
from .models import UnifiedModelManager
from .session import OUT_RATE, CallSession, TurnRecord
from .vad import RATE as IN_RATE

FRAME_S = 0.02
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
    recording: np.ndarray  # (n, 2) int16 at 24 kHz: left the caller, right the agent
    turns: list[TurnRecord]
    input_s: float


async def run_call(models: UnifiedModelManager, caller_16k: np.ndarray, caller_24k: np.ndarray,
                   settings: Settings | None = None, realtime: bool = False, seed: int | None = None) -> CallResult:
    """Play `caller_16k` (int16 mono) into a session; return the stereo call recording."""
    clock = VirtualClock()
    session = CallSession(models, settings, clock=clock, seed=seed)
    in_step = int(IN_RATE * FRAME_S)
    out_step = int(OUT_RATE * FRAME_S)
    n_in = -(-len(caller_16k) // in_step)
    silence_in = np.zeros(in_step, dtype=np.int16)
    # Slot i of the timeline is [i, i + 1) x 20 ms. Caller frame i has fully arrived at
    # the end of its slot; the frame the player takes then plays in slot i + 1.
    agent: list[np.ndarray] = [np.zeros(out_step, dtype=np.int16)]
    i = 0
    try:
        while True:
            t = (i + 1) * FRAME_S
            if i >= n_in and (not session.agent_busy or t > n_in * FRAME_S + TAIL_LIMIT_S):
                break
            if realtime or session.agent_busy:
                await clock.sleep_until(t)
            else:
                clock.skip_to(t)
            chunk = caller_16k[i * in_step:(i + 1) * in_step] if i < n_in else silence_in
            session.push_audio(chunk, IN_RATE)
            frame = session.outbound.get_nowait()
            agent.append(frame.samples if frame is not None else np.zeros(out_step, dtype=np.int16))
            await asyncio.sleep(0)  # let the session's tasks run
            i += 1
    finally:
        await session.close()
    right = np.concatenate(agent) if agent else np.zeros(0, dtype=np.int16)
    n = max(len(right), len(caller_24k))
    recording = np.zeros((n, 2), dtype=np.int16)
    recording[:len(caller_24k), 0] = caller_24k
    recording[:len(right), 1] = right
    return CallResult(recording, session.turns, len(caller_16k) / IN_RATE)
