"""TTSServiceDirect on the tiny profile: streaming, sentences, cancellation, retries, fallback."""

import asyncio
import logging

import numpy as np
import pytest

from agent.config import load_settings
from agent.errors import AudioGenerationError, InputError
from agent.models.snac import FADE_SAMPLES, FRAME_SAMPLES
from agent.models.tts import sentence_chars


async def collect(agen):
    return [chunk async for chunk in agen]


def test_a_sentence_fits_the_token_budget():
    """A sentence longer than orpheus.max_tokens can say would be cut off mid-word: the
    default settings agree (200 characters x 7 tokens <= 1400), and a longer
    tts.max_sentence_chars gives way to what max_tokens allows."""
    settings = load_settings("default", env={})
    o = settings.orpheus
    assert sentence_chars(settings) == settings.tts.max_sentence_chars == 200
    assert sentence_chars(settings) * o.tokens_per_char <= o.max_tokens
    longer = settings.replace("tts", max_sentence_chars=250)
    assert sentence_chars(longer) == 200
    assert sentence_chars(longer.replace("orpheus", max_tokens=700)) == 100


async def test_a_sentence_split_for_the_token_budget(make_service, tiny_settings):
    service = make_service(tiny_settings.replace("orpheus", tokens_per_char=5.0))  # 140 tokens: 28 characters
    text = "This sentence is far too long for one stream of the tiny model."
    await collect(service.synthesize(text, "tara", seed=1))
    assert service.monitor.requests[-1].tokens == 3 * 140  # three pieces, each cut at max_tokens


async def test_speech_cut_at_max_tokens_fades_out(make_service):
    """The tiny model never says end_of_speech, so every stream stops at max_tokens: on
    a frame boundary, with its last 15 ms faded to silence (no click)."""
    service = make_service()
    audio = np.concatenate(await collect(service.synthesize("Fade me out.", "tara", seed=3)))
    m = service.monitor.requests[-1]
    assert m.tokens == service.settings.orpheus.max_tokens and len(audio) == m.tokens // 7 * FRAME_SAMPLES
    tail = np.abs(audio[-FADE_SAMPLES:].astype(float))
    peak = np.abs(audio.astype(float)).max()
    assert audio[-1] == 0 and tail[-FADE_SAMPLES // 10:].max() < 0.05 * peak
    assert tail[:FADE_SAMPLES // 2].max() > tail[-FADE_SAMPLES // 4:].max()


async def test_streams_int16_chunks_with_every_frame(make_service):
    service = make_service()
    chunks = await collect(service.synthesize("Hello there. This is a second sentence.", "tara", seed=1))
    assert chunks and all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    m = service.monitor.requests[-1]
    assert m.tokens > 0 and m.tokens % 7 == 0
    # Nothing lost: every generated frame is in the audio.
    assert sum(len(c) for c in chunks) == m.tokens // 7 * FRAME_SAMPLES
    assert m.ttft_ms is not None and m.ttfa_ms is not None and m.ttfa_ms >= m.ttft_ms
    assert m.audio_s > 0 and m.snac_s > 0 and m.error is None
    assert not service.active


def same_speech(a, b):
    """Same tokens give the same audio up to SNAC's streaming tolerance: the decoder's
    windows adapt to timing, and frames decoded in other windows differ by ~1e-4."""
    a, b = np.concatenate(a).astype(float), np.concatenate(b).astype(float)
    return len(a) == len(b) and np.linalg.norm(a - b) <= 2e-3 * np.linalg.norm(b)


async def test_same_seed_same_audio(make_service):
    service = make_service()
    a = await collect(service.synthesize("Repeat after me.", "leo", seed=5))
    b = await collect(service.synthesize("Repeat after me.", "leo", seed=5))
    c = await collect(service.synthesize("Repeat after me.", "leo", seed=6))
    assert same_speech(a, b) and not same_speech(a, c)


async def test_bad_input(make_service):
    service = make_service()
    for text in ("", "   \n\t"):
        with pytest.raises(InputError, match="empty"):
            await collect(service.synthesize(text, "tara"))
    with pytest.raises(InputError, match="unknown voice 'nobody'"):
        await collect(service.synthesize("Hello.", "nobody"))


async def test_consumer_that_stops_stops_generation_and_frees_memory(make_service):
    service = make_service()
    orpheus = service.orpheus
    agen = service.synthesize("This sentence would take a while to say in full.", "tara", seed=2)
    first = await agen.__anext__()
    assert len(first) > 0
    (stream,) = service.active
    assert stream.tokens.holds_cache
    calls_at_stop = orpheus.forward_calls
    await agen.aclose()
    await asyncio.sleep(0.2)
    assert orpheus.forward_calls - calls_at_stop <= 1
    assert not stream.tokens.holds_cache and not service.active
    assert stream.tokens.position < service.settings.orpheus.max_tokens


async def test_cancelled_task_frees_its_stream(make_service):
    service = make_service()
    started = asyncio.Event()

    async def consume():
        async for _ in service.synthesize("Keep talking until you are cancelled.", "tara", seed=3):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    (stream,) = service.active
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    calls = service.orpheus.forward_calls
    await asyncio.sleep(0.2)
    assert service.orpheus.forward_calls - calls <= 1
    assert not stream.tokens.holds_cache and not service.active


def inject_failures(service, should_fail):
    """Make the real token stream raise (as a CUDA error would) when should_fail(voice) says so."""
    real_open = service.open_stream
    opened = []

    def open_stream(sentence, voice, seed, params, loop=None):
        stream = real_open(sentence, voice, seed, params, loop)
        opened.append(voice)
        if should_fail(voice):
            def broken_step():
                raise RuntimeError(f"injected failure for {voice}")
            stream.tokens.step = broken_step
        return stream

    service.open_stream = open_stream
    return opened


async def test_retries_with_backoff_then_succeeds(make_service, tiny_settings):
    service = make_service(tiny_settings.replace("tts", retry_backoff_s=0.01, max_retries=2))
    failures = iter([True, True])
    opened = inject_failures(service, lambda voice: next(failures, False))
    chunks = await collect(service.synthesize("Third time lucky.", "zoe", seed=1))
    assert chunks and opened == ["zoe", "zoe", "zoe"]
    assert service.monitor.requests[-1].retries == 2


async def test_voice_that_keeps_failing_falls_back(make_service, tiny_settings, caplog):
    service = make_service(tiny_settings.replace("tts", retry_backoff_s=0.0, max_retries=1, fallback_voice="leah"))
    opened = inject_failures(service, lambda voice: voice == "dan")
    with caplog.at_level(logging.WARNING):
        chunks = await collect(service.synthesize("First sentence. Second sentence.", "dan", seed=1))
    assert chunks
    # dan fails twice, then leah speaks both sentences.
    assert opened == ["dan", "dan", "leah", "leah"]
    assert service.monitor.requests[-1].voice == "leah"
    assert "falling back to leah" in caplog.text


async def test_gives_up_with_a_clear_error(make_service, tiny_settings):
    service = make_service(tiny_settings.replace("tts", retry_backoff_s=0.0, max_retries=1, fallback_voice="leah"))
    inject_failures(service, lambda voice: True)
    with pytest.raises(AudioGenerationError, match="failed after 4 attempts.*dan, leah"):
        await collect(service.synthesize("Nobody can say this.", "dan"))
    assert service.monitor.requests[-1].error
    assert not service.active


async def test_concurrent_requests_interleave(make_service):
    service = make_service()
    a, b = await asyncio.gather(
        collect(service.synthesize("One voice.", "tara", seed=1)),
        collect(service.synthesize("Another voice.", "mia", seed=2)),
    )
    alone = await collect(service.synthesize("One voice.", "tara", seed=1))
    assert same_speech(a, alone) and b
