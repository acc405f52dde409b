"""The streaming SNAC decoder against one-shot decoding of the same codes."""

import numpy as np
import pytest

from agent.models.snac import FRAME_SAMPLES, StreamingSNACDecoder, Window, decode_batch, decode_frames, rel_l2

N_FRAMES = 48  # about 4 s of audio


@pytest.fixture(scope="module")
def snac(tts_models):
    return tts_models[1]


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(3).integers(0, 4096, size=(N_FRAMES, 7)).tolist()


@pytest.fixture(scope="module")
def one_shot(snac, frames):
    return decode_frames(snac, frames)


def stream_all(decoder, frames):
    chunks, tokens_at_first_audio = [], None
    for i, frame in enumerate(frames):
        audio = decoder.push(frame)
        if audio is not None:
            chunks.append(audio)
            tokens_at_first_audio = tokens_at_first_audio or (i + 1) * 7
    tail = decoder.flush()
    if tail is not None:
        chunks.append(tail)
    return chunks, tokens_at_first_audio


def test_default_mode_equals_one_shot_and_loses_nothing(snac, frames, one_shot):
    decoder = StreamingSNACDecoder(snac, "default")
    chunks, first_after = stream_all(decoder, frames)
    audio = np.concatenate(chunks)
    assert first_after <= 14 and decoder.first_audio_after_tokens <= 14
    assert len(chunks[0]) == FRAME_SAMPLES  # frame 0 comes first, on its own
    assert len(audio) == len(one_shot) == N_FRAMES * FRAME_SAMPLES  # first and last frames present
    assert rel_l2(audio, one_shot) < 2e-3
    # After the first chunk every frame had 2 frames of context on each side.
    assert rel_l2(audio[FRAME_SAMPLES:], one_shot[FRAME_SAMPLES:]) < 5e-4
    # The first and last frames carry sound, not padding.
    assert np.abs(audio[:FRAME_SAMPLES]).max() > 0.01 and np.abs(audio[-FRAME_SAMPLES:]).max() > 0.01


def test_baseline_mode_behaves_like_the_reference(snac, frames, one_shot):
    decoder = StreamingSNACDecoder(snac, "baseline")
    chunks, first_after = stream_all(decoder, frames)
    assert first_after == 28
    assert all(len(c) == FRAME_SAMPLES for c in chunks)
    assert len(chunks) == N_FRAMES - 3  # frame 0 and the last 2 frames are never emitted
    # The chunk emitted at frame n is frame n-3 of the one-shot decode, inexactly.
    err = rel_l2(chunks[5], one_shot[6 * FRAME_SAMPLES:7 * FRAME_SAMPLES])
    assert 1e-3 < err < 0.2


def test_windows_grow_when_playback_is_ahead(snac, frames, one_shot):
    # A clock that never moves: generation is instant, so playback is always ahead.
    decoder = StreamingSNACDecoder(snac, "default", max_frames_per_window=16, clock=lambda: 0.0)
    chunks, _ = stream_all(decoder, frames)
    assert decoder.windows < N_FRAMES / 2
    assert max(len(c) for c in chunks) >= 4 * FRAME_SAMPLES
    assert rel_l2(np.concatenate(chunks), one_shot) < 2e-3


def test_short_stream_is_flushed_whole(snac, frames):
    for n in (1, 2, 3):
        decoder = StreamingSNACDecoder(snac, "default")
        chunks, _ = stream_all(decoder, frames[:n])
        assert sum(len(c) for c in chunks) == n * FRAME_SAMPLES


def test_windows_lengthened_to_the_longest_decode_in_one_call(snac, frames, one_shot):
    """decode_batch(pad_left=True): windows of three lengths take in earlier frames of
    their own stream, so one SNAC call decodes them, and each emits what the one-shot
    decode has there. A stream too short to lengthen keeps its own call."""
    calls = []
    real_decode = snac.decode

    def counted(codes):
        calls.append(codes[0].shape)
        return real_decode(codes)

    def decoder_with(n):
        d = StreamingSNACDecoder(snac, "default")
        for frame in frames[:n]:
            d.add(frame)
        return d

    jobs = [(decoder_with(30), Window(20, 30, 22, 28)), (decoder_with(40), Window(34, 40, 36, 38)),
            (decoder_with(17), Window(10, 17, 12, 15)), (decoder_with(6), Window(0, 6, 1, 4))]
    snac.decode = counted
    try:
        padded = decode_batch(snac, jobs, pad_left=True)
        assert [tuple(s) for s in calls] == [(3, 10), (1, 6)]  # 3 windows as 10 frames; the 6-frame stream alone
        assert [d.last_window.frames for d, _ in jobs] == [10, 10, 10, 6]
        calls.clear()
        plain = decode_batch(snac, jobs, pad_left=False)
        assert len(calls) == 3  # lengths 10, 6 (twice) and 7
    finally:
        snac.decode = real_decode
    for (_, w), a, b in zip(jobs, padded, plain):
        expected = one_shot[w.emit_start * FRAME_SAMPLES:w.emit_end * FRAME_SAMPLES]
        assert len(a) == len(b) == len(expected)
        assert rel_l2(a, expected) < 1e-3 and rel_l2(b, expected) < 1e-3
