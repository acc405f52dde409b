"""VAD segmentation on real speech (espeak-ng fixtures), silence and noise, with each
detector: Silero VAD (its trained weights) and webrtcvad."""

import dataclasses

import numpy as np
import pytest

from agent.audio import Resampler, read_audio
from agent.call.vad import SileroDetector, SpeechDiscarded, SpeechStarted, Utterance, VADSegmenter, WebRtcDetector
from agent.config import load_settings
from agent.errors import InputError
from agent.models.silero import SileroVAD


@pytest.fixture(scope="module", params=["silero", "webrtc"])
def vad_settings(request):
    return dataclasses.replace(load_settings("tiny", env={}).vad, engine=request.param)


def detector(settings):
    if settings.engine == "silero":
        return SileroDetector(_silero().stream(), settings.threshold)
    return WebRtcDetector(settings)


_SILERO: list[SileroVAD] = []


def _silero() -> SileroVAD:
    if not _SILERO:
        _SILERO.append(SileroVAD())
    return _SILERO[0]


def silence(s):
    return np.zeros(int(16000 * s), dtype=np.int16)


def segment(settings, audio, step=480):
    vad = VADSegmenter(settings, detector(settings))
    events = []
    for i in range(0, len(audio), step):
        events += vad.push(audio[i:i + step])
    return events


def test_two_utterances(vad_settings, speech):
    audio = np.concatenate([silence(1.0), speech[0], silence(2.0), speech[1], silence(1.5)])
    events = segment(vad_settings, audio)
    utts = [e for e in events if isinstance(e, Utterance)]
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(utts) == 2 and len(starts) == 2
    second_start = 1.0 + len(speech[0]) / 16000 + 2.0
    assert utts[0].start == pytest.approx(1.0, abs=0.2) and utts[1].start == pytest.approx(second_start, abs=0.25)
    for u in utts:
        # Decided end_ms after the last voiced frame; pre-roll kept before the start.
        assert u.decided_at - u.end == pytest.approx(vad_settings.end_ms / 1000, abs=0.05)
        assert len(u.audio) / 16000 >= u.end - u.start + vad_settings.preroll_ms / 1000 - 0.05
        assert not u.cut
    # The first syllable is in the utterance: its audio starts before the speech does.
    assert np.abs(utts[0].audio[:int(0.1 * 16000)]).max() < 500


def test_silence_and_noise_start_no_turn(vad_settings):
    rng = np.random.default_rng(0)
    assert segment(vad_settings, silence(5)) == []
    for amplitude in (300, 3000, 10000):  # webrtcvad alone calls the loud ones speech
        noise = (rng.standard_normal(16000 * 5) * amplitude).clip(-32768, 32767).astype(np.int16)
        assert segment(vad_settings, noise) == [], amplitude
    hum = (np.sin(2 * np.pi * 100 * np.arange(16000 * 4) / 16000) * 8000).astype(np.int16)
    assert segment(vad_settings, hum) == []


def test_speech_in_moderate_noise_is_found(vad_settings, speech):
    rng = np.random.default_rng(1)
    audio = np.concatenate([silence(1.0), speech[0], silence(1.5)]).astype(np.float64)
    audio += rng.standard_normal(len(audio)) * 300
    events = segment(vad_settings, audio.clip(-32768, 32767).astype(np.int16))
    assert sum(isinstance(e, Utterance) for e in events) == 1


def test_short_sound_is_discarded(vad_settings, speech):
    settings = dataclasses.replace(vad_settings, min_utterance_ms=1500)
    blip = speech[0][int(0.3 * 16000):int(0.9 * 16000)]  # a fragment of a word
    events = segment(settings, np.concatenate([silence(1.0), blip, silence(1.5)]))
    assert not any(isinstance(e, Utterance) for e in events)
    assert any(isinstance(e, SpeechDiscarded) for e in events)


def test_long_speech_is_cut_at_the_maximum(vad_settings, speech):
    settings = dataclasses.replace(vad_settings, max_utterance_s=2.0)
    events = segment(settings, np.concatenate([silence(0.5), speech[0], silence(1.0)]))
    utts = [e for e in events if isinstance(e, Utterance)]
    assert utts[0].cut and utts[0].decided_at - utts[0].start == pytest.approx(2.0, abs=0.05)


def test_any_push_size_gives_the_same_result(vad_settings, speech):
    audio = np.concatenate([silence(0.5), speech[1], silence(1.0)])
    a = [(type(e), e.start) for e in segment(vad_settings, audio, 480)]
    b = [(type(e), e.start) for e in segment(vad_settings, audio, 137)]
    assert a == b and a


def test_resampler_accepts_any_rate_and_channels(speech):
    x = speech[0]
    stereo48 = np.repeat(np.interp(np.arange(len(x) * 3) / 3, np.arange(len(x)), x), 2).astype(np.int16)
    resampler = Resampler(16000)
    out = np.concatenate([resampler.push(stereo48[i:i + 1920], 48000, 2) for i in range(0, len(stereo48), 1920)])
    assert abs(len(out) - len(x)) < 100
    n = min(len(out), len(x)) - 200
    corr = np.corrcoef(out[100:n].astype(float), x[100:n].astype(float))[0, 1]
    assert corr > 0.9
    assert resampler.push(x[:320], 16000, 1) is not None


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 4)
    with pytest.raises(InputError, match="cannot read audio"):
        read_audio(bad, 16000)
    with pytest.raises(InputError, match="no such file"):
        read_audio(tmp_path / "missing.wav", 16000)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError):
        read_audio(empty, 16000)
