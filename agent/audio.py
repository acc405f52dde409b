"""Audio in and out: reading any audio file, resampling, writing WAV. PyAV does the work."""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from agent.errors import InputError

log = logging.getLogger(__name__)

_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def single_threaded_ffmpeg() -> bool:
    """Tell FFmpeg the machine has one CPU, so that the filter graphs and encoders PyAV and
    aiortc make for each call (every resampler, every Opus encoder) start no worker threads.

    By default each one starts a thread per core (three or four per WebRTC call, times the
    cores), and they end only when the garbage collector gets round to the call's objects:
    a long-running server's threads then grow with its calls. 20 ms audio frames gain
    nothing from slice threads. Process-wide; called once when this module is imported.
    Returns whether FFmpeg's libavutil was found."""
    for path in _loaded_libavutil():
        try:
            ctypes.CDLL(path).av_cpu_force_count(1)  # dlopen hands back the copy already loaded
            return True
        except (OSError, AttributeError):
            continue
    log.debug("FFmpeg's libavutil not found: its per-call worker threads stay on")
    return False


def _loaded_libavutil() -> list[str]:
    """Paths of the libavutil PyAV uses: the one mapped into this process (Linux), else the
    copy bundled in PyAV's wheel."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split()[-1] for line in maps if "libavutil" in line and "/" in line}
    except OSError:
        mapped = set()
    bundled = glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libavutil*.so*"))
    return sorted(mapped) + sorted(bundled)


single_threaded_ffmpeg()


class Resampler:
    """Streaming conversion of int16 audio at any rate and channel count to mono int16 at
    `rate`. Stateful: keep one per stream so no samples are lost between pushes."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._resampler: av.AudioResampler | None = None
        self._input: tuple[int, int] | None = None

    def push(self, samples: np.ndarray, rate: int, channels: int = 1) -> np.ndarray:
        """`samples`: int16, shape (n,) for mono or (n, channels) / interleaved (n * channels,)."""
        samples = np.asarray(samples, dtype=np.int16).reshape(-1)
        if rate == self.rate and channels == 1:
            return samples
        if channels not in _LAYOUTS:
            raise InputError(f"unsupported channel count {channels}")
        if self._input != (rate, channels):  # a new format starts a new resampler
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.rate)
            self._input = (rate, channels)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=_LAYOUTS[channels])
        frame.sample_rate = rate
        assert self._resampler is not None  # made above with the first format
        out = self._resampler.resample(frame)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in out]) if out else np.zeros(0, np.int16)


def read_audio(path: str | Path, rate: int, max_s: float | None = None) -> np.ndarray:
    """Decode any audio file to mono int16 at `rate`. Raises InputError, one line, when the
    file is missing, unreadable, corrupt, has no audio or (with `max_s`) holds more than
    `max_s` seconds."""
    parts = list(iter_audio(path, rate, max_s))
    if not parts:
        raise InputError(f"{path}: the file holds no audio samples")
    return np.concatenate(parts).astype(np.int16, copy=False)


def iter_audio(path: str | Path, rate: int, max_s: float | None = None) -> Iterator[np.ndarray]:
    """Decode any audio file to mono int16 chunks at `rate`, as it decodes. With `max_s`,
    InputError as soon as the decoded audio passes `max_s` seconds, counted in the file's
    own samples at their own rate before any resampling: what a header claims (its length,
    a 1 Hz sample rate) is never trusted, and nothing past the limit is read or resampled."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path}: no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            decoded_s = 0.0
            for frame in container.decode(audio=0):
                if frame.sample_rate <= 0:
                    raise InputError(f"{path}: invalid sample rate {frame.sample_rate}")
                decoded_s += frame.samples / frame.sample_rate
                if max_s is not None and decoded_s > max_s:
                    raise InputError(f"{path}: longer than {max_s:g} s, the limit (run.max_input_s)")
                yield from _mono(resampler.resample(frame))
            yield from _mono(resampler.resample(None))
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (av.FFmpegError, OSError, ValueError, ZeroDivisionError) as e:
        raise InputError(f"{path}: cannot read audio ({e.__class__.__name__}: {_short(e)})") from None


def _mono(frames: list[av.AudioFrame]) -> Iterator[np.ndarray]:
    for f in frames:
        yield f.to_ndarray().reshape(-1)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "unknown error"


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """Write int16 samples, shape (n,) for mono or (n, channels), as a PCM WAV."""
    samples = np.asarray(samples, dtype=np.int16)
    with WavWriter(path, rate, 1 if samples.ndim == 1 else samples.shape[1]) as w:
        w.write(samples)


class WavWriter:
    """A PCM WAV written as it goes: int16 blocks, shape (n,) or (n, channels), appended
    one after another (the header is kept valid after each), so that nothing long waits
    in memory to be written."""

    def __init__(self, path: str | Path, rate: int, channels: int) -> None:
        self.rate = rate
        self.channels = channels
        self.frames = 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._wav = wave.open(self._file, "wb")
        self._wav.setnchannels(channels)
        self._wav.setsampwidth(2)
        self._wav.setframerate(rate)

    def write(self, samples: np.ndarray) -> None:
        samples = np.ascontiguousarray(samples, dtype=np.int16)
        self._wav.writeframes(samples.tobytes())
        self.frames += len(samples)

    def flush(self) -> None:
        """Put what is written (with a header that counts it) into the operating system's
        hands, so that it outlives a crash of this process."""
        self._file.flush()

    def close(self) -> None:
        self._wav.close()
        self._file.close()

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
