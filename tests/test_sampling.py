"""Position-constrained sampling and the token loop on the real tiny Orpheus model."""

import torch

from agent.orpheus import (AUDIO_BASE, CODEBOOK_SIZE, END_OF_SPEECH, VOCAB_SIZE, ConstrainedSampler,
                           SamplingParams, token_to_code)


def make_sampler(params=SamplingParams(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return ConstrainedSampler(params, [1, 2, 3], torch.device("cpu"), g)


def test_disallowed_ids_are_never_chosen_even_when_most_likely():
    sampler = make_sampler()
    for position in range(70):
        logits = torch.randn(VOCAB_SIZE)
        slot = position % 7
        # Make every id outside this slot's range far more likely.
        logits[:AUDIO_BASE + slot * CODEBOOK_SIZE] += 100
        logits[AUDIO_BASE + (slot + 1) * CODEBOOK_SIZE:] += 100
        token = sampler(logits, position)
        # end_of_speech, boosted too, is the one other id allowed, and only at slot 0.
        assert token_to_code(token, position) is not None or (token == END_OF_SPEECH and slot == 0)


def test_end_of_speech_only_at_a_frame_boundary():
    sampler = make_sampler(SamplingParams(temperature=0.0))
    for position in range(21):
        logits = torch.zeros(VOCAB_SIZE)
        logits[END_OF_SPEECH] = 1000.0
        token = sampler(logits, position)
        if position % 7 == 0:
            assert token == END_OF_SPEECH
        else:
            assert token != END_OF_SPEECH and token_to_code(token, position) is not None


def test_repetition_penalty_applies_to_seen_ids():
    sampler = make_sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    logits = torch.zeros(VOCAB_SIZE)
    logits[AUDIO_BASE + 5] = 3.0
    logits[AUDIO_BASE + 6] = 2.0
    assert sampler(logits, 0) == AUDIO_BASE + 5
    assert sampler(logits, 7) == AUDIO_BASE + 6  # 5 was seen: 3.0 / 2 < 2.0


def test_generation_stays_aligned_and_is_repeatable(tts_models):
    orpheus = tts_models[0]
    prompt = orpheus.prompt_ids("tara", "Stay in line, please.")
    params = SamplingParams(max_tokens=70)
    runs = []
    for _ in range(2):
        stream = orpheus.stream(prompt, params, seed=7)
        tokens = []
        while (t := stream.step()) is not None:
            tokens.append(t)
        runs.append(tokens)
        assert not stream.holds_cache
    assert runs[0] == runs[1]
    assert len(runs[0]) % 7 == 0 and 0 < len(runs[0]) <= 70
    assert all(token_to_code(t, i) is not None for i, t in enumerate(runs[0]))
    other = orpheus.stream(prompt, params, seed=8)
    assert [other.step() for _ in range(7)] != runs[0][:7]
