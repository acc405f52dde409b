"""Position-constrained sampling and the token loop on the real tiny Orpheus model."""

import pytest
import torch

from agent.models.orpheus import AUDIO_BASE, CODEBOOK_SIZE, END_OF_SPEECH, VOCAB_SIZE, ConstrainedSampler, SamplingParams, token_to_code


def make_sampler(params=SamplingParams(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return ConstrainedSampler(params, g, torch.device("cpu"))


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


def test_sample_rows_matches_probabilities_and_top_p():
    from agent.engine.generation import sample_rows

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    one = torch.ones(1)
    draws = [int(sample_rows(scores, one, one, torch.rand(1, generator=g))[0]) for _ in range(4000)]
    freq = [draws.count(i) / len(draws) for i in range(4)]
    assert all(abs(f - p) < 0.03 for f, p in zip(freq, [0.5, 0.3, 0.15, 0.05]))
    # top_p 0.7 keeps the two most likely (0.5 + 0.3 reaches it), renormalised.
    draws = [int(sample_rows(scores, one, torch.tensor([0.7]), torch.rand(1, generator=g))[0]) for _ in range(2000)]
    assert set(draws) == {0, 1} and abs(draws.count(0) / 2000 - 0.625) < 0.04
    assert int(sample_rows(scores, torch.zeros(1), one, torch.tensor([0.99]))[0]) == 0  # greedy


def test_batched_sampling_gives_each_row_what_it_gets_alone():
    from agent.models.orpheus import AUDIO_IDS, audio_block, sample_audio

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, VOCAB_SIZE, generator=g) * 3
    positions = torch.tensor([0, 1, 6, 7, 13])
    seen = torch.rand(5, AUDIO_IDS + 1, generator=g) < 0.3
    t, p, rp = torch.full((5,), 0.6), torch.full((5,), 0.8), torch.full((5,), 1.1)
    u = torch.rand(5, generator=g, dtype=torch.float64)
    batched = sample_audio(audio_block(logits), positions, seen, t, p, rp, u)
    alone = [int(sample_audio(audio_block(logits[i:i + 1]), positions[i:i + 1], seen[i:i + 1], t[:1], p[:1],
                              rp[:1], u[i:i + 1])[0]) for i in range(5)]
    assert batched.tolist() == alone


# -- device placement: every sampling tensor on the logits' device ------------------
# CUDA refuses an op that mixes a device tensor with a non-scalar CPU tensor; so does
# PyTorch's `meta` device, which runs each op's shape logic without data. Sampling on
# meta logits therefore catches, on a CPU machine, any tensor left on the CPU.

class MetaValues(torch.overrides.TorchFunctionMode):
    """Reading a meta tensor's value (int(), .item(), .tolist()) gives zeros: meta
    tensors hold no data, and the code after the tensor ops only needs some value to go
    on. Every tensor op still runs, and still refuses mixed devices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("__int__", "__index__", "__float__", "__bool__", "item", "tolist") and args[0].is_meta:
            zeros = torch.zeros(args[0].shape, dtype=args[0].dtype)
            return zeros.tolist() if name == "tolist" else getattr(zeros, name)()
        return func(*args, **(kwargs or {}))


META = torch.device("meta")


def test_meta_device_refuses_a_cpu_operand_as_cuda_does():
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros(2, 3, device=META) / torch.ones(1, 1)


def test_sample_index_keeps_its_tensors_on_the_logits_device():
    from agent.engine.generation import sample_index

    with MetaValues():
        for temperature in (0.0, 0.7):
            assert sample_index(torch.zeros(50, device=META), temperature, 0.9, torch.Generator()) == 0


def test_sample_rows_takes_cpu_settings_for_device_logits():
    from agent.engine.generation import sample_rows

    with MetaValues():
        choice = sample_rows(torch.zeros(3, 50, device=META), torch.tensor([0.0, 0.5, 1.0]), torch.full((3,), 0.9),
                             torch.rand(3, dtype=torch.float64))
    assert choice.device == META and choice.shape == (3,)


def test_orpheus_sampling_keeps_its_tensors_on_the_logits_device():
    from agent.models.orpheus import AUDIO_IDS, audio_block, sample_audio

    with MetaValues():
        sampler = ConstrainedSampler(SamplingParams(), torch.Generator(), META)
        assert isinstance(sampler(torch.zeros(VOCAB_SIZE, device=META), 3), int)
        block = audio_block(torch.zeros(2, VOCAB_SIZE, device=META))
        seen = torch.zeros(2, AUDIO_IDS + 1, dtype=torch.bool, device=META)
        cpu = torch.tensor([0.6, 0.0])
        columns = sample_audio(block, torch.tensor([0, 8]), seen, cpu, cpu, cpu, torch.rand(2, dtype=torch.float64))
    assert columns.device == META


def test_batched_samplers_keep_their_tensors_on_the_logits_device():
    """What the two batchers sample with (SpeechBatcher, ReplyBatcher)."""
    from agent.engine.generation import sample_choices
    from agent.models.orpheus import AUDIO_IDS, audio_block, sample_streams

    generators = [torch.Generator(), torch.Generator()]
    with MetaValues():
        tokens = sample_choices(torch.zeros(2, 50, device=META), [0.0, 0.2], [0.95, 0.95], generators)
        block = audio_block(torch.zeros(2, VOCAB_SIZE, device=META))
        seen = torch.zeros(2, AUDIO_IDS + 1, dtype=torch.bool, device=META)
        columns = sample_streams(block, [0, 13], seen, [SamplingParams(), SamplingParams(temperature=0.0)],
                                 generators)
    assert tokens.device == columns.device == META and tokens.shape == columns.shape == (2,)
