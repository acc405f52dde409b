"""SNAC 24 kHz: loading, frames to codes, and the streaming decoder.

A frame is 7 codes: L0 = [p0], L1 = [p1, p4], L2 = [p2, p3, p5, p6]; it decodes to
2048 samples (85.3 ms). SNAC's decoder is convolutional, so a frame decoded inside a
window matches the one-shot decode once it has 2 frames of context on each side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agent.engine.generation import load_failure
from agent.rates import OUT_RATE

FRAME_TOKENS = 7  # codes in one SNAC frame (24 kHz model: 1 + 2 + 4 over three codebooks)
FRAME_SAMPLES = 2048
FRAME_S = FRAME_SAMPLES / OUT_RATE
# A stream cut off at its token limit ends mid-sound; its last samples fade out over
# this long (15 ms), so it ends at zero rather than with a click.
FADE_SAMPLES = 360

# The published hubertsiuzdak/snac_24khz config.
SNAC_24KHZ_CONFIG = {
    "sampling_rate": OUT_RATE,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}


def load_snac(source: str, device: torch.device, noise: bool = True,
              check_memory: Callable[[str, int], None] | None = None) -> torch.nn.Module:
    """Load SNAC from a Hub id or a local directory (config.json + pytorch_model.bin)."""
    from snac import SNAC

    if check_memory is not None:
        check_memory(f"SNAC ({source})", 20_000_000 * 4)  # 19.8 M parameters in float32
    try:
        model = SNAC.from_pretrained(source)
    except Exception as e:
        raise load_failure("SNAC", source, e) from e
    if not noise:
        disable_noise(model)
    return model.to(device).eval()


def disable_noise(model: torch.nn.Module) -> None:
    """Replace SNAC's noise blocks with identities so decoding is deterministic."""
    from snac.layers import NoiseBlock

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NoiseBlock):
                setattr(module, name, torch.nn.Identity())


def frames_to_codes(frames: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """Frames of 7 codes -> SNAC's three code tensors, (1, T), (1, 2T), (1, 4T)."""
    t = torch.tensor(frames, dtype=torch.long, device=device).reshape(-1, FRAME_TOKENS)
    return [
        t[:, 0].reshape(1, -1),
        t[:, [1, 4]].reshape(1, -1),
        t[:, [2, 3, 5, 6]].reshape(1, -1),
    ]


@torch.inference_mode()
def decode_frames(snac: Any, frames: Sequence[Sequence[int]]) -> np.ndarray:
    """One-shot decode of whole frames to float32 samples in [-1, 1]."""
    if not frames:
        return np.zeros(0, dtype=np.float32)
    device = next(snac.parameters()).device
    audio = snac.decode(frames_to_codes(frames, device))
    return audio[0, 0].float().cpu().numpy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| over equal lengths (the shorter is zero-padded)."""
    n = max(len(a), len(b))
    a = np.pad(a, (0, n - len(a)))
    b = np.pad(b, (0, n - len(b)))
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


class StreamingSNACDecoder:
    """Turns frames into audio as they arrive. Two modes:

    - "baseline": the reference server. Once 4 frames exist, each new frame decodes the
      last 4 and emits the second (samples 2048:4096). First audio after 28 tokens;
      frame 0 and the last 2 frames are never emitted.
    - "default": frame 0 is emitted as soon as 2 frames exist (14 tokens). After that a
      frame is emitted once it has 2 frames of right context (its left context is always
      there), so it matches the one-shot decode. flush() emits everything left at the end.
      Decoding several frames per window costs far less per second of audio than one
      window per frame, so frames wait while that is safe. From the measured time to
      make a frame (g) and to decode one window frame (d), a window takes the larger of
      - the frames that can arrive and be decoded before playback runs dry, and
      - the fewest new frames per window that keep up with real time, (4 d) / (85 ms - g - d),
        or the most allowed when nothing keeps up (as on a CPU), since small windows
        would only fall further behind.

    `clock` tells the time used to follow playback: the listener is assumed to play
    each chunk as soon as it arrives, pausing when it runs dry (the bench passes a
    simulated clock; live use keeps perf_counter).
    """

    LEFT = 2
    RIGHT = 2
    FIRST_CHUNK_FRAMES = 2

    def __init__(self, snac: Any, mode: str = "default", max_frames_per_window: int = 16,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if mode not in ("default", "baseline"):
            raise ValueError(f"unknown decoder mode {mode!r}")
        self.snac = snac
        self.mode = mode
        self.max_frames_per_window = max_frames_per_window
        self.clock = clock
        self.frames: list[list[int]] = []
        self.emitted = 0  # frames whose audio has gone out (default mode)
        self.emitted_samples = 0
        self.decode_s = 0.0
        self.windows = 0
        self.last_window: Window | None = None  # as decoded (decode_batch may lengthen it)
        self.first_audio_after_tokens: int | None = None
        self._play_end: float | None = None  # when the audio emitted so far finishes playing
        self._gen_s_per_frame: float | None = None  # time between frames, decoding excluded
        self._decode_s_per_frame: float | None = None  # decode time per window frame
        self._last_push_done: float | None = None
        self._fade_at_end = False

    def fade_at_end(self) -> None:
        """The stream was cut off (its token limit): the final audio fades out to silence."""
        self._fade_at_end = True

    def push(self, frame: Sequence[int]) -> np.ndarray | None:
        """Add one frame; return new audio (float32) when some is ready."""
        self.add(frame)
        try:
            window = self.next_window(final=False)
            return self._decode(window) if window is not None else None
        finally:
            self.mark_done()

    def flush(self) -> np.ndarray | None:
        """The stream ended: return the audio not yet emitted."""
        window = self.next_window(final=True)
        return self._decode(window) if window is not None else None

    # The three parts of push(), for a caller that decodes many streams' windows in one
    # batch (decode_batch): add the frame, ask which window is due, accept its audio.

    def add(self, frame: Sequence[int]) -> None:
        now = self.clock()
        if self._last_push_done is not None:
            self._gen_s_per_frame = _ema(self._gen_s_per_frame, now - self._last_push_done)
        self.frames.append(list(frame))

    def mark_done(self) -> None:
        """The frame just added is handled (decoded or not): generation time restarts."""
        self._last_push_done = self.clock()

    def next_window(self, final: bool) -> Window | None:
        """The window to decode now, if any (`final`: the stream has ended)."""
        n = len(self.frames)
        if self.mode == "baseline":
            # The reference never flushes its last frames.
            return None if final or n * FRAME_TOKENS <= 27 else Window(n - 4, n, n - 3, n - 2)
        if self.emitted == 0 and not final:
            if n < self.FIRST_CHUNK_FRAMES:
                return None
            return Window(0, self.FIRST_CHUNK_FRAMES, 0, 1)
        ready = n if final else n - self.RIGHT
        pending = ready - self.emitted
        if pending <= 0 or (not final and pending < self._frames_wanted()):
            return None
        start = self.emitted
        return Window(max(0, start - self.LEFT), min(n, ready + self.RIGHT), start, ready)

    @property
    def lead_s(self) -> float:
        """How far the audio emitted so far runs ahead of the listener (0 before any)."""
        return 0.0 if self._play_end is None else max(0.0, self._play_end - self.clock())

    def _frames_wanted(self) -> int:
        if self._play_end is None or self._decode_s_per_frame is None:
            return 1
        lead_s = self._play_end - self.clock()
        gen = self._gen_s_per_frame or 0.0
        dec = self._decode_s_per_frame
        context_s = (self.LEFT + self.RIGHT) * dec
        # Frames we can wait for: k * (gen + dec) + context_s <= lead_s.
        affordable = int((lead_s - context_s) / (gen + dec)) if gen + dec > 0 else self.max_frames_per_window
        # Smallest window that keeps up: k * (gen + dec) + context_s <= k * FRAME_S.
        spare = FRAME_S - gen - dec
        sustaining = math.ceil(context_s / spare) if spare > 0 else self.max_frames_per_window
        return max(1, min(self.max_frames_per_window, max(affordable, sustaining)))

    def _decode(self, window: Window) -> np.ndarray:
        return decode_batch(self.snac, [(self, window)])[0]

    def accept(self, window: Window, audio: torch.Tensor, elapsed: float) -> np.ndarray:
        """Take the decoded window (1-D samples) and return the part it emits."""
        lo = (window.emit_start - window.start) * FRAME_SAMPLES
        hi = (window.emit_end - window.start) * FRAME_SAMPLES
        out = audio[lo:hi].float().cpu().numpy()
        if self._fade_at_end and window.emit_end == len(self.frames):  # the last frame goes out
            out = fade_out(out, FADE_SAMPLES)
        self.decode_s += elapsed
        self._decode_s_per_frame = _ema(self._decode_s_per_frame, elapsed / window.frames)
        self.windows += 1
        self.last_window = window
        if self.first_audio_after_tokens is None:
            self.first_audio_after_tokens = len(self.frames) * FRAME_TOKENS
        now = self.clock()
        self._play_end = max(self._play_end or now, now) + len(out) / OUT_RATE
        self.emitted = window.emit_end
        self.emitted_samples += len(out)
        return out


@dataclass(frozen=True)
class Window:
    """Frames [start, end) are decoded; the audio of frames [emit_start, emit_end) goes out."""
    start: int
    end: int
    emit_start: int
    emit_end: int

    @property
    def frames(self) -> int:
        return self.end - self.start


@torch.inference_mode()
def decode_batch(snac: Any, jobs: Sequence[tuple[StreamingSNACDecoder, Window]], pad_left: bool = False) -> list[np.ndarray]:
    """Decode many streams' windows with one SNAC call per window length (SNAC decodes
    a batch of equally long code sequences); returns each job's emitted audio.

    `pad_left` lengthens windows to the batch's longest by taking in earlier frames of
    their own stream (more left context leaves the emitted audio as it is, within SNAC's
    tolerance), so a step needs one call rather than one per length: worth it on a GPU,
    where a small SNAC call costs its kernel launches rather than its arithmetic."""
    if pad_left and jobs:
        longest = max(w.frames for _, w in jobs)
        jobs = [(d, Window(w.end - longest, w.end, w.emit_start, w.emit_end) if w.end >= longest else w)
                for d, w in jobs]
    out: list[np.ndarray | None] = [None] * len(jobs)
    by_length: dict[int, list[int]] = {}
    for i, (_, window) in enumerate(jobs):
        by_length.setdefault(window.frames, []).append(i)
    device = next(snac.parameters()).device
    for indices in by_length.values():
        t0 = time.perf_counter()
        codes = [frames_to_codes(jobs[i][0].frames[jobs[i][1].start:jobs[i][1].end], device) for i in indices]
        audio = snac.decode([torch.cat(level) for level in zip(*codes)])
        share = (time.perf_counter() - t0) / len(indices)
        for row, i in enumerate(indices):
            decoder, window = jobs[i]
            out[i] = decoder.accept(window, audio[row, 0], share)
    return out  # type: ignore[return-value]


def fade_out(audio: np.ndarray, samples: int) -> np.ndarray:
    """`audio` with its last `samples` ramped down (raised cosine) to exactly zero."""
    n = min(samples, len(audio))
    if n == 0:
        return audio
    out = audio.copy()
    out[-n:] *= (0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, n))).astype(out.dtype)
    return out


def _ema(previous: float | None, value: float, alpha: float = 0.3) -> float:
    return value if previous is None else (1 - alpha) * previous + alpha * value


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] -> int16 PCM."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16)
