"""The per-call audio seam toward the caller: the agent's audio queued as fixed-size frames
for the transport's player, with backpressure for TTS, clear() for barge-in, and hold() /
release() to pause the agent mid-word while a sound may be an interruption."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OutFrame:
    """One frame of the agent's audio, tagged with its turn and segment."""
    samples: np.ndarray  # int16, exactly one frame
    turn: int
    segment: int


class OutboundAudio:
    """The agent's audio as fixed-size frames. TTS waits in put() while `max_frames` are
    queued (backpressure); the player takes frames with get_nowait(); clear() drops
    everything at once (barge-in)."""

    def __init__(self, frame_samples: int, max_frames: int,
                 on_played: Callable[[OutFrame], None] | None = None) -> None:
        self.frame_samples = frame_samples
        self.max_frames = max_frames
        self.on_played = on_played
        self._frames: deque[OutFrame] = deque()
        self._carry = np.zeros(0, dtype=np.int16)
        self._carry_tag = (0, 0)
        self._space = asyncio.Event()
        self._space.set()
        self.held = False  # the player gets nothing (silence) until release(); the queue stays

    def __len__(self) -> int:
        return len(self._frames)

    async def put(self, samples: np.ndarray, turn: int, segment: int) -> int:
        """Queue audio; returns how many whole frames it completed."""
        if not len(self._carry):
            self._carry_tag = (turn, segment)
        data = np.concatenate([self._carry, samples.astype(np.int16)])
        n = len(data) // self.frame_samples
        made = 0
        for i in range(n):
            while len(self._frames) >= self.max_frames:
                self._space.clear()
                await self._space.wait()
            tag = self._carry_tag if i == 0 else (turn, segment)
            self._frames.append(OutFrame(data[i * self.frame_samples:(i + 1) * self.frame_samples], *tag))
            made += 1
        self._carry = data[n * self.frame_samples:]
        if len(self._carry):
            self._carry_tag = (turn, segment)
        return made

    def finish(self) -> None:
        """End of a reply: the last partial frame goes out, padded with silence."""
        if len(self._carry):
            frame = np.zeros(self.frame_samples, dtype=np.int16)
            frame[:len(self._carry)] = self._carry
            self._frames.append(OutFrame(frame, *self._carry_tag))
            self._carry = np.zeros(0, dtype=np.int16)

    def get_nowait(self) -> OutFrame | None:
        if self.held or not self._frames:
            return None
        frame = self._frames.popleft()
        self._space.set()
        if self.on_played is not None:
            self.on_played(frame)
        return frame

    def hold(self) -> None:
        """Pause playback where it is: the queued audio waits (and TTS with it)."""
        self.held = True

    def release(self) -> None:
        """Play on from where hold() paused."""
        self.held = False

    def clear(self) -> int:
        self.held = False
        dropped = len(self._frames)
        self._frames.clear()
        self._carry = np.zeros(0, dtype=np.int16)
        self._space.set()
        return dropped
