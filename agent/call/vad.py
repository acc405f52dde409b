"""Cutting the caller's audio into utterances.

Frames of 10/20/30 ms at 16 kHz. A detector says which frames are voiced: Silero VAD (a
trained model, vad.engine = "silero") or webrtcvad gated by the recent noise floor
("webrtc": webrtcvad alone calls loud steady noise speech). An utterance starts when
most frames of the last `start_ms` are voiced (the pre-roll before that is kept), and
ends after `end_ms` of mostly unvoiced frames, or when it reaches `max_utterance_s` (it
is cut and answered).

With an end-of-turn model, the segmenter also says when the caller pauses (SpeechPaused,
after `pause_ms` without a voiced frame) and goes on (SpeechResumed); whoever asks the
model ends the utterance early with end_utterance(), and `end_ms` (turn.max_silence_ms)
is then only the limit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import webrtcvad

from agent.config import VADSettings
from agent.models.silero import WINDOW, SileroStream
from agent.rates import IN_RATE

START_RATIO = 0.8  # share of voiced frames in the start window
END_RATIO = 0.9  # share of unvoiced frames in the end window
FLOOR_WINDOW_S = 3.0
SILERO_HYSTERESIS = 0.15  # in speech, a frame stays speech down to threshold minus this


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
    pause: int | None = None  # the SpeechPaused it ended in (no voiced frame since), if any


@dataclass(frozen=True)
class SpeechDiscarded:
    """What started as speech was too short to be an utterance (a cough, a click)."""
    start: float
    decided_at: float


@dataclass(frozen=True)
class SpeechPaused:
    """The caller has paused (`pause_ms` without a voiced frame): the turn may be over.
    `audio` is the utterance so far; `pause` numbers the pauses of one segmenter."""
    pause: int
    start: float  # of the utterance
    end: float  # end of the last voiced frame
    decided_at: float
    audio: np.ndarray


@dataclass(frozen=True)
class SpeechResumed:
    """The caller spoke again after a SpeechPaused: the utterance goes on."""
    pause: int
    t: float


VADEvent = SpeechStarted | Utterance | SpeechDiscarded | SpeechPaused | SpeechResumed
# A per-frame stage before the decision: (frame) -> (the frame to use, whether it may be
# speech at all). The echo guard (agent/call/echo.py) is one.
FrameFilter = Callable[[np.ndarray], tuple[np.ndarray, bool]]


class SpeechDetector(Protocol):
    """Says whether each frame (16 kHz int16, in order, every one) is voiced."""
    def is_speech(self, frame: np.ndarray) -> bool: ...


class WebRtcDetector:
    """webrtcvad, and the frame above the recent noise floor and min_level_db."""

    def __init__(self, settings: VADSettings) -> None:
        self.s = settings
        self.vad = webrtcvad.Vad(settings.aggressiveness)
        self._levels: deque[float] = deque(maxlen=max(1, int(FLOOR_WINDOW_S * 1000 / settings.frame_ms)))

    def is_speech(self, frame: np.ndarray) -> bool:
        level = _level_db(frame)
        self._levels.append(level)  # the floor sees every frame
        floor = min(self._levels)
        if level < self.s.min_level_db or level < floor + self.s.snr_db:
            return False
        return self.vad.is_speech(frame.tobytes(), IN_RATE)


class SileroDetector:
    """Silero VAD's probability, window by window (32 ms); a frame takes the decision of
    the latest whole window, with hysteresis so a word's soft end does not flicker."""

    def __init__(self, stream: SileroStream, threshold: float) -> None:
        self.stream = stream
        self.threshold = threshold
        self._buffer = np.zeros(0, dtype=np.float32)
        self._speaking = False

    def is_speech(self, frame: np.ndarray) -> bool:
        self._buffer = np.concatenate([self._buffer, frame.astype(np.float32) / 32768.0])
        while len(self._buffer) >= WINDOW:
            prob = self.stream.probability(self._buffer[:WINDOW])
            self._buffer = self._buffer[WINDOW:]
            self._speaking = prob >= self.threshold - (SILERO_HYSTERESIS if self._speaking else 0.0)
        return self._speaking


class VADSegmenter:
    """Feed 16 kHz mono int16 audio with push(); get SpeechStarted / Utterance events
    (and SpeechPaused / SpeechResumed when `pause_ms` is given). `end_ms` overrides
    settings.end_ms (the end-of-turn model's longest wait)."""

    def __init__(self, settings: VADSettings, detector: SpeechDetector, frame_filter: FrameFilter | None = None,
                 end_ms: int | None = None, pause_ms: int | None = None) -> None:
        self.s = settings
        self.detector = detector
        self.frame_filter = frame_filter
        self.frame = IN_RATE * settings.frame_ms // 1000
        self.frame_s = settings.frame_ms / 1000
        self._start_n = max(1, settings.start_ms // settings.frame_ms)
        self._end_n = max(1, (end_ms or settings.end_ms) // settings.frame_ms)
        self._pause_n = max(1, pause_ms // settings.frame_ms) if pause_ms else None
        self._preroll_n = settings.preroll_ms // settings.frame_ms
        self._recent: deque[tuple[np.ndarray, bool]] = deque(maxlen=max(self._start_n, self._preroll_n + self._start_n))
        self._pending = np.zeros(0, dtype=np.int16)
        self._frames_seen = 0
        self._in_speech = False
        self._speech: list[np.ndarray] = []
        self._tail: deque[bool] = deque(maxlen=self._end_n)
        self._voiced_frames = 0
        self._utt_start = 0.0
        self._last_voiced_end = 0.0
        self._unvoiced_run = 0  # frames since the last voiced one
        self._pauses = 0
        self._paused = False

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

    @property
    def pause(self) -> int | None:
        """The number of the pause the caller is in now (since a SpeechPaused), else None."""
        return self._pauses if self._paused else None

    @property
    def voiced_ms(self) -> int:
        """Voiced audio in the utterance so far (0 outside one)."""
        return self._voiced_frames * self.s.frame_ms if self._in_speech else 0

    @property
    def silent_ms(self) -> int:
        """Time since the utterance's last voiced frame (0 outside one)."""
        return self._unvoiced_run * self.s.frame_ms if self._in_speech else 0

    def drop_utterance(self) -> None:
        """Forget the utterance under way, with no event (a sound taken for a backchannel)."""
        self._in_speech = False
        self._paused = False
        self._speech = []

    def end_utterance(self) -> Utterance | SpeechDiscarded | None:
        """End the utterance now (the end-of-turn model heard a finished turn); None
        when there is none."""
        if not self._in_speech:
            return None
        return self._finish(self.now, cut=False)

    def _frame(self, frame: np.ndarray) -> VADEvent | None:
        may_be_speech = True
        if self.frame_filter is not None:
            frame, may_be_speech = self.frame_filter(frame)
        voiced = self.detector.is_speech(frame) and may_be_speech  # the detector first: it hears every frame
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
                self._unvoiced_run = 0
                self._tail.clear()
                self._recent.clear()
                return SpeechStarted(self._utt_start, frame_end)
            return None
        self._speech.append(frame)
        self._tail.append(voiced)
        if voiced:
            self._voiced_frames += 1
            self._last_voiced_end = frame_end
            self._unvoiced_run = 0
        else:
            self._unvoiced_run += 1
        too_long = frame_end - self._utt_start >= self.s.max_utterance_s
        if self._pause_n is None:  # the silence timer: the end window mostly unvoiced
            ended = len(self._tail) == self._end_n and self._tail.count(False) >= END_RATIO * self._end_n
        else:  # the end-of-turn model's limit: this long without a voiced frame
            ended = self._unvoiced_run >= self._end_n
        if ended or too_long:
            return self._finish(frame_end, cut=too_long and not ended)
        if voiced and self._paused:
            self._paused = False
            return SpeechResumed(self._pauses, frame_end)
        if self._pause_n is not None and not self._paused and self._unvoiced_run == self._pause_n:
            self._paused = True
            self._pauses += 1
            return SpeechPaused(self._pauses, self._utt_start, self._last_voiced_end, frame_end, np.concatenate(self._speech))
        return None

    def _finish(self, decided_at: float, cut: bool) -> Utterance | SpeechDiscarded:
        pause = self.pause
        self._in_speech = False
        self._paused = False
        audio = np.concatenate(self._speech)
        self._speech = []
        if self._voiced_frames * self.s.frame_ms < self.s.min_utterance_ms:
            return SpeechDiscarded(self._utt_start, decided_at)
        return Utterance(self._utt_start, self._last_voiced_end, decided_at, audio, cut=cut, pause=pause)


def _level_db(frame: np.ndarray) -> float:
    power = float(np.mean(frame.astype(np.float64) ** 2))
    return 10 * math.log10(power / 32768.0**2 + 1e-12)
