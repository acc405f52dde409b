"""Cutting the caller's audio into utterances with webrtcvad.

Frames of 10/20/30 ms at 16 kHz. A frame counts as voiced when webrtcvad says so AND
it stands above the recent noise floor: webrtcvad alone calls loud steady noise
speech. An utterance starts when most frames of the last `start_ms` are voiced (the
pre-roll before that is kept), and ends after `end_ms` of mostly unvoiced frames, or
when it reaches `max_utterance_s` (it is cut and answered).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import webrtcvad

from agent.config import VADSettings
from agent.rates import IN_RATE

START_RATIO = 0.8  # share of voiced frames in the start window
END_RATIO = 0.9  # share of unvoiced frames in the end window
FLOOR_WINDOW_S = 3.0


@dataclass(frozen=True)
class SpeechStarted:
    """The caller started speaking (stream time of the first voiced frame, in seconds)."""
    start: float
    decided_at: float


@dataclass(frozen=True)
class Utterance:
    """A finished utterance: 16 kHz int16 audio (with pre-roll); times in stream seconds.
    `end` is the end of the last voiced frame; `decided_at` when the end was decided."""
    start: float
    end: float
    decided_at: float
    audio: np.ndarray
    cut: bool = False  # True when max_utterance_s ended it


@dataclass(frozen=True)
class SpeechDiscarded:
    """What started as speech was too short to be an utterance (a cough, a click)."""
    start: float
    decided_at: float


VADEvent = SpeechStarted | Utterance | SpeechDiscarded
# A per-frame stage before the decision: (frame) -> (the frame to use, whether it may be
# speech at all). The echo guard (agent/call/echo.py) is one.
FrameFilter = Callable[[np.ndarray], tuple[np.ndarray, bool]]


class VADSegmenter:
    """Feed 16 kHz mono int16 audio with push(); get SpeechStarted / Utterance events."""

    def __init__(self, settings: VADSettings, frame_filter: FrameFilter | None = None) -> None:
        self.s = settings
        self.frame_filter = frame_filter
        self.vad = webrtcvad.Vad(settings.aggressiveness)
        self.frame = IN_RATE * settings.frame_ms // 1000
        self.frame_s = settings.frame_ms / 1000
        self._start_n = max(1, settings.start_ms // settings.frame_ms)
        self._end_n = max(1, settings.end_ms // settings.frame_ms)
        self._preroll_n = settings.preroll_ms // settings.frame_ms
        self._recent: deque[tuple[np.ndarray, bool]] = deque(maxlen=max(self._start_n, self._preroll_n + self._start_n))
        self._levels: deque[float] = deque(maxlen=max(1, int(FLOOR_WINDOW_S / self.frame_s)))
        self._pending = np.zeros(0, dtype=np.int16)
        self._frames_seen = 0
        self._in_speech = False
        self._speech: list[np.ndarray] = []
        self._tail: deque[bool] = deque(maxlen=self._end_n)
        self._voiced_frames = 0
        self._utt_start = 0.0
        self._last_voiced_end = 0.0

    @property
    def now(self) -> float:
        """Stream time: seconds of audio analysed so far."""
        return self._frames_seen * self.frame_s

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    def push(self, pcm: np.ndarray) -> list[VADEvent]:
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        data = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        events: list[VADEvent] = []
        n = len(data) // self.frame
        for i in range(n):
            event = self._frame(data[i * self.frame:(i + 1) * self.frame])
            if event is not None:
                events.append(event)
        self._pending = data[n * self.frame:].copy()
        return events

    def is_voiced(self, frame: np.ndarray) -> bool:
        level = _level_db(frame)
        self._levels.append(level)
        floor = min(self._levels)
        if level < self.s.min_level_db or level < floor + self.s.snr_db:
            return False
        return self.vad.is_speech(frame.tobytes(), IN_RATE)

    def _frame(self, frame: np.ndarray) -> VADEvent | None:
        may_be_speech = True
        if self.frame_filter is not None:
            frame, may_be_speech = self.frame_filter(frame)
        voiced = self.is_voiced(frame) and may_be_speech  # is_voiced first: the noise floor sees every frame
        self._frames_seen += 1
        frame_end = self.now
        if not self._in_speech:
            self._recent.append((frame, voiced))
            window = list(self._recent)[-self._start_n:]
            if len(window) == self._start_n and sum(v for _, v in window) >= START_RATIO * self._start_n:
                self._in_speech = True
                self._speech = [f for f, _ in self._recent]  # pre-roll + the start window
                first = next(i for i, (_, v) in enumerate(self._recent) if v)
                self._utt_start = frame_end - (len(self._recent) - first) * self.frame_s
                self._voiced_frames = sum(v for _, v in window)
                self._last_voiced_end = frame_end
                self._tail.clear()
                self._recent.clear()
                return SpeechStarted(self._utt_start, frame_end)
            return None
        self._speech.append(frame)
        self._tail.append(voiced)
        if voiced:
            self._voiced_frames += 1
            self._last_voiced_end = frame_end
        too_long = frame_end - self._utt_start >= self.s.max_utterance_s
        ended = len(self._tail) == self._end_n and self._tail.count(False) >= END_RATIO * self._end_n
        if not (ended or too_long):
            return None
        self._in_speech = False
        audio = np.concatenate(self._speech)
        self._speech = []
        if self._voiced_frames * self.s.frame_ms < self.s.min_utterance_ms:
            return SpeechDiscarded(self._utt_start, frame_end)
        return Utterance(self._utt_start, self._last_voiced_end, frame_end, audio, cut=too_long and not ended)


def _level_db(frame: np.ndarray) -> float:
    power = float(np.mean(frame.astype(np.float64) ** 2))
    return 10 * math.log10(power / 32768.0**2 + 1e-12)
