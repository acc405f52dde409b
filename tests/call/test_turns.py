"""Turn-taking with the trained models and their real weights: Silero VAD, Smart Turn v3.2,
the segmenter's pauses, and a session that ends a finished turn early and waits out a
mid-sentence pause. Recordings: tests/fixtures/turns (espeak-ng; see make_turns.py)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from agent.bench import TURN_VARIANTS, bench_turns, load_turn_recordings, turn_variant
from agent.call.factory import SessionFactory
from agent.call.vad import SileroDetector, SpeechPaused, SpeechResumed, SpeechStarted, Utterance, VADSegmenter
from agent.config import load_settings
from agent.errors import ConfigError, ModelInitializationError
from agent.models.manager import UnifiedModelManager
from agent.models.onnx import packaged_file
from agent.models.silero import WINDOW, SileroVAD
from agent.models.smart_turn import SmartTurn
from signaling.headless import run_call


@pytest.fixture(scope="module")
def recordings():
    return {r.file: r for r in load_turn_recordings()}


@pytest.fixture(scope="module")
def silero():
    return SileroVAD()


@pytest.fixture(scope="module")
def smart_turn():
    model = SmartTurn(workers=1)
    yield model
    model.close()


def smart_settings(**turn):
    return load_settings("tiny", env={}).replace("snac", noise=False).replace("turn", engine="smart_turn", **turn)


# -- the models --------------------------------------------------------------------

def test_silero_hears_speech_and_not_silence_or_noise(silero, recordings):
    speech = recordings["complete-0-0.flac"].audio
    stream = silero.stream()
    probs = [stream.probability(speech[i:i + WINDOW].astype(np.float32) / 32768)
             for i in range(0, int(2.1 * 16000) - WINDOW, WINDOW)]
    lead = int(0.3 * 16000) // WINDOW  # the recording's silence before the speech
    assert max(probs[:lead]) < 0.2 and np.mean(np.array(probs[lead + 2:]) > 0.5) > 0.7
    noise = (np.random.default_rng(0).standard_normal(16000 * 2) * 0.05).astype(np.float32)
    stream = silero.stream()
    assert max(stream.probability(noise[i:i + WINDOW]) for i in range(0, len(noise) - WINDOW, WINDOW)) < 0.5


def test_silero_streams_keep_their_own_state(silero, recordings):
    # Two calls at once share the model: each stream's answers are those it gives alone.
    speech = recordings["complete-1-1.flac"].audio[:16000 * 2]
    windows = [speech[i:i + WINDOW].astype(np.float32) / 32768 for i in range(0, len(speech) - WINDOW, WINDOW)]
    alone = [silero.stream().probability(w) for w in windows[:1]]
    a, b = silero.stream(), silero.stream()
    mixed = []
    for w in windows:
        mixed.append(a.probability(w))
        b.probability(np.zeros(WINDOW, np.float32))
    solo_stream = silero.stream()
    solo = [solo_stream.probability(w) for w in windows]
    assert mixed == pytest.approx(solo, abs=1e-6) and alone[0] == pytest.approx(solo[0], abs=1e-6)


def test_smart_turn_tells_a_finished_sentence_from_an_unfinished_phrase(smart_turn, recordings):
    done = recordings["complete-1-0.flac"]  # "Can you tell me the weather in Paris?"
    assert smart_turn.probability(done.audio[:int((done.speech_end_s + 0.2) * 16000)]) > 0.8
    cut = recordings["paused-0-1.flac"]  # "What time does the ... last train leave?"
    assert cut.pause_s is not None
    assert smart_turn.probability(cut.audio[:int((cut.pause_s[0] + 0.2) * 16000)]) < 0.2


def test_smart_turn_hears_the_last_eight_seconds(smart_turn, recordings):
    # The model hears 8 s, padded in front: what came long before does not change its answer.
    done = recordings["complete-1-0.flac"]
    audio = done.audio[:int((done.speech_end_s + 0.2) * 16000)]
    longer = np.concatenate([recordings["paused-0-1.flac"].audio[:16000 * 8], audio])
    assert smart_turn.probability(longer) == pytest.approx(smart_turn.probability(longer[-8 * 16000:]), abs=1e-5)
    # Short audio is padded in front: silence before it changes nothing.
    padded = np.concatenate([np.zeros(16000 * 3, np.int16), audio])
    assert smart_turn.probability(padded) == pytest.approx(smart_turn.probability(audio), abs=1e-5)


async def test_smart_turn_runs_off_the_event_loop(smart_turn, recordings):
    audio = recordings["complete-0-0.flac"].audio
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    p = await smart_turn.predict(audio)
    task.cancel()
    assert p == pytest.approx(smart_turn.probability(audio), abs=1e-6)
    assert ticks > 0  # the loop ran while the model did


# -- the segmenter -----------------------------------------------------------------

def segment(vad, audio, step=320):
    events = []
    for i in range(0, len(audio), step):
        events += vad.push(audio[i:i + step])
    return events


def test_pauses_are_announced_and_the_silence_limit_still_ends_the_turn(silero, recordings):
    rec = recordings["paused-0-4.flac"]  # a 1000 ms pause mid-sentence
    s = smart_settings()
    vad = VADSegmenter(s.vad, SileroDetector(silero.stream(), s.vad.threshold), end_ms=s.turn.max_silence_ms,
                       pause_ms=s.turn.min_silence_ms)
    events = segment(vad, rec.audio)
    kinds = [type(e) for e in events]
    assert kinds[0] is SpeechStarted and kinds[-1] is Utterance and kinds.count(Utterance) == 1
    pauses = [e for e in events if isinstance(e, SpeechPaused)]
    assert rec.pause_s is not None
    in_gap = [p for p in pauses if rec.pause_s[0] - 0.05 <= p.end <= rec.pause_s[1]]
    assert in_gap, [p.end for p in pauses]
    assert any(isinstance(e, SpeechResumed) and e.pause == in_gap[0].pause for e in events)
    # Nobody ended it early: the silence limit did, after the real end.
    (utt,) = [e for e in events if isinstance(e, Utterance)]
    assert utt.end == pytest.approx(rec.speech_end_s, abs=0.15)
    assert utt.decided_at - utt.end == pytest.approx(s.turn.max_silence_ms / 1000, abs=0.06)
    # Each pause carries the utterance so far, from its start.
    assert len(in_gap[0].audio) / 16000 == pytest.approx(in_gap[0].decided_at - utt.start + s.vad.preroll_ms / 1000,
                                                         abs=0.1)


def test_end_utterance_ends_it_at_once(silero, recordings):
    rec = recordings["complete-0-0.flac"]
    s = smart_settings()
    vad = VADSegmenter(s.vad, SileroDetector(silero.stream(), s.vad.threshold), end_ms=s.turn.max_silence_ms,
                       pause_ms=s.turn.min_silence_ms)
    assert vad.end_utterance() is None  # no speech yet
    events, utt = [], None
    for i in range(0, len(rec.audio), 320):
        events += vad.push(rec.audio[i:i + 320])
        if any(isinstance(e, SpeechPaused) for e in events) and vad.pause is not None and rec.speech_end_s < vad.now:
            utt = vad.end_utterance()
            break
    assert isinstance(utt, Utterance) and utt.decided_at == pytest.approx(vad.now)
    assert vad.pause is None and not vad.in_speech and vad.end_utterance() is None


# -- a call ------------------------------------------------------------------------

async def decided_after_end(models, settings, rec) -> tuple[float, int]:
    sessions = SessionFactory(models)
    result = await run_call(sessions, rec.audio, np.zeros(0, np.int16), settings, seed=2)
    assert result.turns, "no turn at all"
    first = result.turns[0]
    return first.decided_at - rec.speech_end_s, len(result.turns)


async def test_a_finished_sentence_is_answered_sooner_than_the_timer_allows(models, recordings):
    rec = recordings["complete-1-0.flac"]
    smart, n = await decided_after_end(models, smart_settings(), rec)
    timer, _ = await decided_after_end(models, smart_settings().replace("turn", engine="silence"), rec)
    assert n == 1
    assert timer >= 0.5 and smart < 0.4 and smart < timer - 0.15, (smart, timer)


async def test_a_mid_sentence_pause_is_waited_out(models, recordings, caplog):
    rec = recordings["paused-0-1.flac"]  # "What time does the" ... 700 ms ... "last train leave?"
    caplog.set_level(logging.INFO, logger="agent.call.session")
    smart, n = await decided_after_end(models, smart_settings(), rec)
    assert n == 1 and smart > 0, smart  # one turn, decided after the sentence was over
    assert "withdrawn" not in caplog.text
    timer, n = await decided_after_end(models, smart_settings().replace("turn", engine="silence"), rec)
    # The 500 ms timer cut the caller off in the pause; when they went on, that turn was
    # taken back (nothing of its reply had been heard) and their words answered together.
    assert "turn 1 withdrawn: the caller went on" in caplog.text
    assert n == 1 and timer > 0


# -- settings and files ------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("VAD__ENGINE", "\"nope\""), ("VAD__THRESHOLD", "0.99"),
                                        ("TURN__ENGINE", "\"timer\""), ("TURN__THRESHOLD", "1.5"),
                                        ("TURN__MIN_SILENCE_MS", "5"), ("TURN__MAX_SILENCE_MS", "40000")])
def test_settings_out_of_range_are_refused_naming_the_key(key, value):
    name = key.lower().replace("__", ".")
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_settings("tiny", env={f"VOICE_AGENT_{key}": value})


def test_the_short_silence_must_be_below_the_limit():
    with pytest.raises(ConfigError, match="turn.min_silence_ms"):
        load_settings("tiny", env={"VOICE_AGENT_TURN__MIN_SILENCE_MS": "2000", "VOICE_AGENT_TURN__MAX_SILENCE_MS": "2000"})


def test_a_missing_or_unreadable_model_file_stops_the_start_with_one_line(tmp_path):
    missing = tmp_path / "none.onnx"
    with pytest.raises(ModelInitializationError, match=f"{missing}.*turn.model") as e:
        UnifiedModelManager(smart_settings(model=str(missing))).load()
    assert "\n" not in str(e.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model" * 100)
    with pytest.raises(ModelInitializationError, match=f"Smart Turn model file {garbage} cannot be read") as e:
        UnifiedModelManager(smart_settings(model=str(garbage))).load()
    assert "\n" not in str(e.value)
    with pytest.raises(ModelInitializationError, match="the no-such-package package is not installed"):
        packaged_file("no-such-package", "data/model.onnx")


def test_a_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelInitializationError, match="Hub repository nobody/no-such-model") as e:
        SmartTurn("nobody/no-such-model")
    assert "\n" not in str(e.value)


# -- the benchmark -----------------------------------------------------------------

def test_bench_turns_compares_the_settings_on_the_recordings():
    all_recordings = load_turn_recordings()
    subset = [r for r in all_recordings if r.file in ("complete-1-0.flac", "paused-0-1.flac")]
    result = bench_turns(load_settings("tiny", env={}), subset)
    names = [name for name, _, _ in TURN_VARIANTS]
    assert list(result["variants"]) == names
    timer, smart = result["variants"]["silero + timer"], result["variants"]["silero + smart turn"]
    assert timer["paused"]["cut_offs"] == 1 and smart["paused"]["cut_offs"] == 0
    assert smart["complete"]["end_to_decided_ms"]["p50"] < timer["complete"]["end_to_decided_ms"]["p50"]
    assert 0 < smart["cpu"]["percent_of_a_core_per_call"] < 100
    assert turn_variant(load_settings("tiny", env={}), {"engine": "webrtc"}, {"engine": "silence"}).vad.engine == "webrtc"


# -- preemptive replies ------------------------------------------------------------

async def first_turn(models, settings, rec):
    result = await run_call(SessionFactory(models), rec.audio, np.zeros(0, np.int16), settings, seed=5)
    assert len(result.turns) == 1, [t.to_dict() for t in result.turns]
    return result.turns[0]


async def test_a_reply_started_at_the_pause_is_under_way_when_the_turn_ends(models, recordings, caplog):
    # The model hears this sentence's end as unfinished (so the silence limit ends it, 2 s
    # later), and its mid-sentence pause as unfinished too.
    rec = recordings["paused-0-1.flac"]
    caplog.set_level(logging.DEBUG, logger="agent.call.session")
    early = await first_turn(models, smart_settings(preemptive=True), rec)
    assert "dropped the reply started at pause 1: the caller went on" in caplog.text  # the mid-sentence one
    assert early.preemptive and early.t_first_token is not None
    assert early.t_first_token < early.t_decision  # written while the model waited
    # Nothing was played before the turn was decided.
    assert early.t_first_frame is not None and early.agent_start is not None
    assert early.t_first_frame >= early.t_decision and early.agent_start >= early.t_decision
    late = await first_turn(models, smart_settings(preemptive=False), rec)
    assert not late.preemptive and late.t_first_token is not None and late.t_first_token > late.t_decision
    # The same decision; the reply heard sooner after it.
    assert early.decided_at - early.end == pytest.approx(late.decided_at - late.end, abs=0.1)
    assert early.agent_start - early.t_decision < late.agent_start - late.t_decision
