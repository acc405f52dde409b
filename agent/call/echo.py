"""Echo-safe barge-in for phone calls: the agent must not take its own voice, coming
back over the line, for the caller talking over it.

Browsers cancel echo before the audio leaves them; phone lines do not, so on a SIP
call the agent's reply comes back delayed (network and gateways, up to
`echo.max_delay_ms`), attenuated (6-30 dB echo return loss), band-limited and through
G.711. The reference is exact: the session hands every frame it plays to play(). Then,
for each caller frame the VAD analyses, process():

1. Delay: GCC-PHAT cross-correlation of the caller's input against the played audio,
   smoothed over time, finds the bulk echo delay once one clear peak stands out.
2. Cancel: a short frequency-domain adaptive filter (overlap-save, per-bin normalised)
   models the echo path around that delay and subtracts its estimate. It adapts only
   while the gate below calls the frame echo, so the caller's voice does not derail it.
3. Gate: what is left may count as the caller's voice only when its power stands
   `echo.margin_db` above the residual echo expected now: the played power at that
   delay (a peak-hold envelope that decays like an echo tail) times the learnt ratio
   of residual to played power. Before the delay is known the envelope spans the
   whole delay range and no cancellation is credited: strict at first, then relaxing
   as the guard learns the line.

The VAD still sees every frame, so the caller's words are never cut: the frame it gets
is the residual, which is the input itself once the agent has been quiet for longer
than the echo delay, and the gate only says whether that frame may count as voiced.
The VAD's start window (vad.start_ms of mostly voiced frames) then makes a barge-in
need sustained speech above the echo, not a stray loud frame.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from agent.audio import Resampler
from agent.config import EchoSettings
from agent.rates import IN_RATE

log = logging.getLogger(__name__)

PRE_MS = 4  # the filter starts this long before the delay peak: resampling filters spread the echo both ways
GCC_WINDOW_S = 0.5  # caller audio correlated per delay estimate
GCC_EVERY_S = 0.1  # how often the delay is estimated while the agent's voice can be coming back
GCC_LOCKED_EVERY = 5  # ... that many times less often once the delay is known
GCC_SMOOTH = 0.6  # weight of the past cross-spectrum (estimates overlap, so this is short memory)
GCC_BETA = 0.8  # PHAT-beta: whitening that still weights empty bands (above 4 kHz on G.711) less
LOCK_SCORE = 8.0  # correlation peak over its standard deviation needed to trust a delay
PEAK_RATIO = 1.5  # ... and over the runner-up at least this far away
PEAK_APART_MS = 2
SAME_DELAY_MS = 1.0  # a new estimate this close to the current delay changes nothing
STEP = 0.3  # adaptive filter step size, normalised per frequency bin (0.5 overshoots on tonal audio)
POWER_SMOOTH = 0.8  # per-bin reference power smoothing for that normalisation
REG_SHARE = 0.1  # normalisation floor, as a share of the mean bin power
TAIL_DB_PER_MS = 0.2  # the echo envelope decays 60 dB in 300 ms: covers dispersion and short reverberation
LEARN_DOWN, LEARN_UP = 0.15, 0.2  # residual/played ratio tracking, per echo frame (log domain)
LEARN_UP_WITHIN = 2.0  # only frames within 3 dB above the ratio raise it (see _learn)
LEARN_CLAMP = math.log(10.0)  # one frame counts as at most 10 dB off the ratio
BODY_SHARE = 0.25  # a frame whose played power is within 6 dB of the envelope is in the echo's body
RATIO_MIN = 1e-4  # never expect less than 40 dB below the played level: echo bursts a phone lets by
UNLOCKED_MARGIN = 2.0  # 3 dB: codec and resampling ripple
ENV_FLOOR = 1e-7  # played power (-70 dBFS) below which nothing echoes worth gating
RESET_AFTER_FRAMES = 5  # frames in a row the filter makes things worse before it starts over
RESYNC_FRAMES = 4  # the played timeline re-anchors when it drifts this far from the caller's
FILL_MAX_S = 1.0  # a pause in playback up to this long is filled with silence; a longer one re-anchors


class _Timeline:
    """Float samples at absolute positions on the caller-input clock; what was never
    written reads as zero. Holds the last `keep` samples (and up to as many more)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.buf = np.zeros(2 * keep, dtype=np.float32)
        self.base = 0  # absolute position of buf[0]

    def write(self, pos: int, x: np.ndarray) -> None:
        end = pos + len(x)
        if end <= self.base:
            return
        if end - self.base > len(self.buf):  # slide: keep the last `keep` samples before `end`
            drop = end - self.keep - self.base
            if drop >= len(self.buf):
                # A write past all that is held (playback resumed after a long pause, e.g. the
                # next reply): nothing held is kept, the timeline starts over at the new base.
                self.buf[:] = 0
            else:
                self.buf[:len(self.buf) - drop] = self.buf[drop:]
                self.buf[len(self.buf) - drop:] = 0
            self.base += drop
        lo = max(pos, self.base)
        self.buf[lo - self.base:end - self.base] = x[lo - pos:]

    def clear_from(self, pos: int) -> None:
        self.buf[max(0, pos - self.base):] = 0

    def read(self, pos: int, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.float32)
        lo, hi = max(pos, self.base), min(pos + n, self.base + len(self.buf))
        if hi > lo:
            out[lo - pos:hi - pos] = self.buf[lo - self.base:hi - self.base]
        return out


class EchoGuard:
    """One call's echo canceller and barge-in gate, on `frame`-sample frames at 16 kHz.

    The session calls received(n) for caller samples as they arrive, play() for each
    frame of the agent's audio a transport takes, and the VAD calls process() per frame.
    """

    def __init__(self, settings: EchoSettings, frame: int) -> None:
        self.frame = frame
        self.max_delay = IN_RATE * settings.max_delay_ms // 1000
        self.margin = 10 ** (settings.margin_db / 10)
        self._window = int(IN_RATE * GCC_WINDOW_S)
        self._fft = 1 << math.ceil(math.log2(self._window + self.max_delay))
        keep = 2 * self.max_delay + self._window + 8 * frame
        self._ref, self._mic = _Timeline(keep), _Timeline(keep)
        self._resampler = Resampler(IN_RATE)
        self._arrived = 0  # caller samples received so far
        self._pos = 0  # caller samples processed (the next frame starts here)
        self._write = 0  # where the resampled played audio continues
        self._next = 0.0  # where the next played sample belongs (ahead of _write by what the resampler holds)
        self._last_play: float | None = None
        self._frames = 0
        self._gcc_every = max(1, round(GCC_EVERY_S * IN_RATE / frame))
        self._cross: np.ndarray | None = None
        self._candidate: int | None = None
        self.delay: int | None = None  # bulk echo delay in samples, once found
        self._pre = 0
        self._w = np.zeros(frame + 1, dtype=np.complex64)  # the echo path around the delay, per bin
        self._power = np.zeros(frame + 1, dtype=np.float32)
        self._reg = 2 * frame * 1e-6  # a -60 dBFS floor in the per-bin normalisation
        self._env = 0.0
        self._worse = 0  # frames in a row the filter made worse
        self._ratio = 1.0  # residual over played power in echo-only frames (learnt)
        self._decay = 10 ** (-TAIL_DB_PER_MS * 1000 * frame / IN_RATE / 10)
        self.erle_db = 0.0  # echo return loss enhancement of the filter (smoothed, echo-only frames)
        self.echo_frames = 0  # frames judged to hold only echo (gated)

    @property
    def delay_ms(self) -> float | None:
        return None if self.delay is None else 1000 * self.delay / IN_RATE

    # -- inputs ----------------------------------------------------------------------

    def received(self, n: int) -> None:
        """`n` caller samples (16 kHz) reached the VAD: the clock that places played audio."""
        self._arrived += n

    def play(self, samples: np.ndarray, rate: int, now: float) -> None:
        """The agent's audio as a transport took it to send, at session time `now`."""
        gap = self._last_play is None or now - self._last_play > 1.5 * len(samples) / rate
        behind = self._arrived - self._next
        if gap and self.frame // 2 < behind <= IN_RATE * FILL_MAX_S:
            # The player had nothing for a moment (TTS fell behind): the line carried
            # silence, so the reference does too, and its resampler runs on through it.
            self._push(np.zeros(round(behind * rate / IN_RATE), dtype=np.int16), rate)
        if (gap and abs(self._arrived - self._next) > self.frame // 2) \
                or abs(self._next - self._arrived) > RESYNC_FRAMES * self.frame:
            # Playback (re)starts: it starts where the caller's input stands now. While it
            # runs, frames follow each other exactly, whatever the input's jitter.
            self._ref.clear_from(self._arrived)
            self._write, self._next = self._arrived, float(self._arrived)
            self._resampler = Resampler(IN_RATE)
        self._push(samples, rate)
        self._last_play = now

    def _push(self, samples: np.ndarray, rate: int) -> None:
        x = self._resampler.push(samples, rate).astype(np.float32) / 32768
        self._ref.write(self._write, x)
        self._write += len(x)  # the resampler holds a few samples back: output trails input
        self._next += len(samples) * IN_RATE / rate

    # -- per frame -------------------------------------------------------------------

    def process(self, frame: np.ndarray) -> tuple[np.ndarray, bool]:
        """One caller frame (int16) -> (the frame with the echo estimate removed, whether
        it may hold the caller's voice)."""
        n, p = self.frame, self._pos
        d = frame.astype(np.float32) / 32768
        self._mic.write(p, d)
        self._pos += n
        self._frames += 1
        # Once found, the delay is only checked now and then: it rarely moves within a call.
        if self._frames % (self._gcc_every * (1 if self.delay is None else GCC_LOCKED_EVERY)) == 0:
            self._estimate_delay()
        spectrum, e = None, d
        if self.delay is None:
            played = self._range_power(p)
        else:
            e, spectrum = self._cancel(p, d)
            played = _power(self._ref.read(p - self.delay - n // 2, 2 * n))
        self._env = max(played, self._env * self._decay)
        p_in, p_err = _power(d), _power(e)
        out, p_out = (e, p_err) if p_err <= p_in else (d, p_in)  # never pass on more than came in
        # A filter that keeps adding more than it removes no longer fits the line (the path
        # changed): start it over. One odd frame at a word's edge is not that.
        self._worse = self._worse + 1 if p_err > 2 * p_in + ENV_FLOOR else 0
        if self._worse >= RESET_AFTER_FRAMES:
            self._w[:] = 0
            self._worse = 0
        # Before the delay is known nothing is learnt: a line never returns more than was
        # played (echo return loss >= 0 dB), so a frame louder than the loudest played
        # frame that can be coming back, by a little, is the caller.
        margin = self.margin if self.delay is not None else UNLOCKED_MARGIN
        may_speak = self._env < ENV_FLOOR or p_out > margin * self._ratio * self._env
        if not may_speak:
            self.echo_frames += 1
            if spectrum is not None:
                # Learn the residual ratio only once cancelling (before, the envelope spans
                # the whole delay range, most of it not come back yet), and only where the
                # echo itself is due, not its decaying tail: both would teach it too low.
                if played > BODY_SHARE * self._env:
                    self._learn(p_out / self._env)
                self._adapt(spectrum, e)
                if p_out > 0:
                    self.erle_db += 0.05 * (10 * math.log10(max(p_in, 1e-12) / p_out) - self.erle_db)
        return np.clip(np.round(out * 32768), -32768, 32767).astype(np.int16), may_speak

    def _range_power(self, p: int) -> float:
        """Loudest played frame that can still be coming back (delay not yet known)."""
        n = self.frame
        lo, hi = p - self.max_delay - n, min(max(p + n, self._write), p + n + self.max_delay)
        seg = self._ref.read(lo, hi - lo)
        seg = seg[:len(seg) // n * n].reshape(-1, n)
        return float((seg * seg).mean(axis=1).max())

    def _cancel(self, p: int, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.frame
        assert self.delay is not None  # called only once the delay is known
        x = self._ref.read(p - (self.delay - self._pre) - n, 2 * n)  # the previous and this block
        spectrum = np.fft.rfft(x)
        echo = np.fft.irfft(spectrum * self._w, 2 * n)[n:]  # overlap-save: the linear part
        return d - echo, spectrum

    def _adapt(self, spectrum: np.ndarray, e: np.ndarray) -> None:
        n = self.frame
        power = spectrum.real ** 2 + spectrum.imag ** 2
        self._power = power if not self._power.any() else POWER_SMOOTH * self._power + (1 - POWER_SMOOTH) * power
        err = np.fft.rfft(np.concatenate([np.zeros(n, dtype=np.float32), e]))
        # Bins the played audio hardly fills (spectral gaps, or above the phone band) would
        # divide line noise by almost nothing: the floor, relative to the mean, keeps them slow.
        floor = REG_SHARE * float(self._power.mean()) + self._reg
        grad = np.fft.irfft(np.conj(spectrum) * err / (self._power + floor), 2 * n)
        grad[n:] = 0  # keep the filter n taps long (the constrained FDAF)
        self._w += STEP * np.fft.rfft(grad).astype(np.complex64)

    def _learn(self, ratio: float) -> None:
        now = math.log(self._ratio)
        r = min(max(math.log(max(ratio, 1e-12)), now - LEARN_CLAMP), now + LEARN_CLAMP)  # one odd frame moves it little
        if ratio <= self._ratio:
            now += LEARN_DOWN * (r - now)
        elif ratio <= LEARN_UP_WITHIN * self._ratio:
            # Raise the expected echo only on frames close to it: the slow rise of a
            # caller's voice must not be learnt as echo, step by step.
            now += LEARN_UP * (r - now)
        self._ratio = min(max(math.exp(now), RATIO_MIN), 4.0)

    def _estimate_delay(self) -> None:
        end, win, dmax = self._pos, self._window, self.max_delay
        ref = self._ref.read(end - win - dmax, win + dmax)
        mic = self._mic.read(end - win, win)
        if _power(ref) < ENV_FLOOR or _power(mic) < ENV_FLOOR:
            return  # nothing played, or nothing heard: no information
        cross = np.fft.rfft(ref, self._fft) * np.conj(np.fft.rfft(mic, self._fft))
        self._cross = cross if self._cross is None else GCC_SMOOTH * self._cross + (1 - GCC_SMOOTH) * cross
        weighted = self._cross / (np.abs(self._cross) ** GCC_BETA + 1e-20)
        corr = np.abs(np.fft.irfft(weighted, self._fft)[:dmax + 1])  # index k: delay dmax - k; either polarity
        k = int(np.argmax(corr))
        guard = IN_RATE * PEAK_APART_MS // 1000
        side = np.concatenate([corr[:max(0, k - guard)], corr[k + guard + 1:]])
        # One clear peak: far above the spread of the rest, and well above the runner-up
        # (voiced speech correlates with itself at pitch periods; two voices can line up).
        if len(side) < 2 or corr[k] < LOCK_SCORE * side.std() + side.mean() or corr[k] < PEAK_RATIO * side.max():
            return
        delay = dmax - k
        same = IN_RATE * SAME_DELAY_MS / 1000
        if self.delay is not None and abs(delay - self.delay) <= same:
            self._candidate = None
            return
        if self._candidate is None or abs(delay - self._candidate) > same:
            self._candidate = delay  # seen twice in a row before it counts: one peak can be chance
            return
        aligned = ref[dmax - delay:dmax - delay + win]
        p_ref = max(_power(aligned), 1e-12)
        # Echo return loss: the input over the played power; the caller talking meanwhile
        # inflates that, but not the least-squares echo gain at the peak (less the energy
        # dispersion spreads off the peak: 6 dB of room for that).
        gain = float(np.dot(mic, aligned)) / (p_ref * win)
        self._set_delay(delay, min(_power(mic) / p_ref, 4 * gain * gain))

    def _set_delay(self, delay: int, erl: float) -> None:
        self.delay, self._candidate = delay, None
        self._pre = min(delay, IN_RATE * PRE_MS // 1000)
        self._w[:] = 0
        self._power[:] = 0
        # Nothing is cancelled yet, so the residual is the echo itself: start from the
        # input over the aligned played power just measured (the caller's voice in it
        # only makes this stricter), and learn down as the filter converges.
        self._ratio = min(max(erl, 1e-3), 1.0)
        log.info("echo delay %.0f ms, return loss %.0f dB", self.delay_ms, -10 * math.log10(max(erl, 1e-12)))


def _power(x: np.ndarray) -> float:
    return float(np.dot(x, x)) / max(1, len(x))
