"""A call's stereo recording (records.audio): the caller left, the agent right, at 24 kHz,
on the call's own timeline, written to disk as the call goes.

The caller's audio arrives without gaps on every transport (RTP and WebRTC carry silence
too), so it is the timeline: a frame the agent plays is placed where the caller's audio
has got to when the player takes it, and never before the end of the agent's previous
frame. What is written is kept on disk with a valid header at least every `flush_s`, so
that a crash (even kill -9) loses at most that much.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.audio import WavWriter
from agent.rates import OUT_RATE

FLUSH_S = 1.0


class CallRecording:
    """Stereo WAV of one call; feed it caller() and agent() audio at `rate`, then close()."""

    def __init__(self, path: str | Path, rate: int = OUT_RATE, flush_s: float = FLUSH_S) -> None:
        self.path = Path(path)
        self.rate = rate
        self._wav = WavWriter(self.path, rate, 2)
        self._flush_every = int(flush_s * rate)
        self._written = 0  # samples on disk
        self._caller: list[np.ndarray] = []  # caller audio from _written on
        self._caller_end = 0  # absolute sample index where the caller's audio has got to
        self._agent = np.zeros(0, dtype=np.int16)  # agent audio from _written on (zeros where silent)
        self._agent_end = 0
        self.closed = False

    @property
    def seconds(self) -> float:
        return max(self._caller_end, self._agent_end) / self.rate

    def caller(self, samples: np.ndarray) -> None:
        if self.closed or not len(samples):
            return
        self._caller.append(np.asarray(samples, dtype=np.int16).reshape(-1))
        self._caller_end += len(samples)
        if self._caller_end - self._written >= self._flush_every:
            self._write(self._caller_end)

    def agent(self, samples: np.ndarray) -> None:
        if self.closed or not len(samples):
            return
        start = max(self._caller_end, self._agent_end)
        end = start + len(samples)
        need = end - self._written
        if need > len(self._agent):
            self._agent = np.concatenate([self._agent, np.zeros(need - len(self._agent), dtype=np.int16)])
        self._agent[start - self._written:need] = samples
        self._agent_end = end

    def _write(self, upto: int) -> None:
        """Write the timeline up to sample `upto`, then flush it to disk."""
        n = upto - self._written
        if n <= 0:
            return
        block = np.zeros((n, 2), dtype=np.int16)
        caller = np.concatenate(self._caller) if self._caller else np.zeros(0, dtype=np.int16)
        block[:min(n, len(caller)), 0] = caller[:n]
        self._caller = [caller[n:]] if len(caller) > n else []
        agent = self._agent[:n]
        block[:len(agent), 1] = agent
        self._agent = self._agent[n:]
        self._wav.write(block)
        self._wav.flush()
        self._written = upto

    def close(self) -> None:
        """Write what is left (the longer side's end) and close the file."""
        if self.closed:
            return
        self._write(max(self._caller_end, self._agent_end))
        self._wav.close()
        self.closed = True
