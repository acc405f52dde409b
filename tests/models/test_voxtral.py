"""Voxtral through the real processor and model classes, on the tiny checkpoint."""

import json
import urllib.parse

import numpy as np
import pytest
import torch
from transformers import VoxtralForConditionalGeneration

from agent.errors import InputError, InsufficientVRAMError, ModelInitializationError
from agent.models.tiny import load_voxtral, tiny_voxtral_dir
from agent.models.voxtral import ChatTurn, ReplyParams, TurnAudio, VoxtralModel, estimate_voxtral_bytes
from agent.rates import IN_RATE

AUDIO, BEGIN_AUDIO, TRANSCRIBE, BOS, EOS, INST, END_INST = 24, 25, 34, 1, 2, 3, 4
TOKENS_PER_30S = 375


@pytest.fixture(scope="module")
def voxtral() -> VoxtralModel:
    return VoxtralModel.load(str(tiny_voxtral_dir()), torch.device("cpu"), torch.float32)


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * IN_RATE)) / IN_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def run(stream) -> list[str]:
    pieces = []
    while (piece := stream.step()) is not None:
        pieces.append(piece)
    return pieces


def test_tiny_checkpoint_is_saved_like_a_hub_repo():
    path = tiny_voxtral_dir()
    for name in ("config.json", "model.safetensors", "tekken.json", "processor_config.json"):
        assert (path / name).exists(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "voxtral" and config["audio_token_id"] == AUDIO
    assert config["audio_config"]["max_source_positions"] == 1500  # 30 s windows, as the processor cuts
    assert config["audio_config"]["num_mel_bins"] == 128
    assert config["text_config"]["vocab_size"] == 131072
    features = json.loads((path / "processor_config.json").read_text())["feature_extractor"]
    assert features["feature_size"] == 128 and features["sampling_rate"] == IN_RATE
    tekken = json.loads((path / "tekken.json").read_text())
    assert tekken["config"]["version"] == "v7" and tekken["audio"]["frame_rate"] == 12.5


def test_loads_through_the_hub_path(voxtral):
    assert isinstance(voxtral.model, VoxtralForConditionalGeneration)
    assert voxtral.source == str(tiny_voxtral_dir())
    assert voxtral.eos_token_id == EOS


def test_tokenizer_is_the_real_tekken(voxtral):
    tokenizer = voxtral.processor.tokenizer
    sentence = "Hello, could you book a table for two at 7 pm? Merci beaucoup!"
    ids = tokenizer.encode(sentence, add_special_tokens=False)
    assert tokenizer.decode(ids) == sentence
    assert len(ids) < len(sentence) / 2  # real BPE merges, not bytes
    # The ids Voxtral's own tekken.json gives "lang:en" (a transcription prompt suffix).
    assert tokenizer.encode("lang:en", add_special_tokens=False) == [9909, 1058, 1262]
    assert tokenizer.convert_ids_to_tokens([AUDIO, BEGIN_AUDIO, TRANSCRIBE]) == ["[AUDIO]", "[BEGIN_AUDIO]",
                                                                                "[TRANSCRIBE]"]


def test_reply_streams_text_and_stops_at_max_new_tokens(voxtral):
    calls = voxtral.forward_calls
    stream = voxtral.reply_stream(tone(1.5), [], "", ReplyParams(max_new_tokens=6), seed=1)
    # <s>[INST][BEGIN_AUDIO] 375 x [AUDIO] [/INST]: 1.5 s pads to one 30 s window.
    assert stream.prompt_ids == [BOS, INST, BEGIN_AUDIO] + [AUDIO] * TOKENS_PER_30S + [END_INST]
    pieces = run(stream)
    assert stream.finished and not stream.holds_cache and stream.tokens == 6 == len(pieces)
    assert "".join(pieces) == stream.text and stream.text.strip()
    assert voxtral.forward_calls - calls == 6  # the prefill made the first token
    assert stream.step() is None and voxtral.forward_calls - calls == 6


def test_stops_at_eos(voxtral, monkeypatch):
    first = voxtral.reply_stream(tone(1.5), [], "", ReplyParams(max_new_tokens=3), seed=5)
    run(first)
    # Make the token this seed samples first the EOS: the same stream must stop at once.
    monkeypatch.setattr(voxtral, "eos_token_id", first.token_ids[0])
    stream = voxtral.reply_stream(tone(1.5), [], "", ReplyParams(max_new_tokens=3), seed=5)
    assert stream.step() is None
    assert stream.stopped_by_model and stream.finished and stream.tokens == 0 and not stream.holds_cache


def test_seed_makes_replies_repeatable(voxtral):
    params = ReplyParams(temperature=0.8, max_new_tokens=8)
    a = voxtral.reply_stream(tone(1.5), [], "", params, seed=7)
    b = voxtral.reply_stream(tone(1.5), [], "", params, seed=7)
    c = voxtral.reply_stream(tone(1.5), [], "", params, seed=8)
    for stream in (a, b, c):
        run(stream)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_audio_reaches_the_model(voxtral):
    params = ReplyParams(temperature=0.0, max_new_tokens=4)  # greedy: only the input decides
    low = voxtral.reply_stream(tone(1.5, 220.0), [], "", params, seed=0)
    high = voxtral.reply_stream(np.random.default_rng(0).uniform(-1, 1, 24000).astype(np.float32), [], "",
                                params, seed=0)
    low.step(), high.step()
    assert low.prompt_ids == high.prompt_ids  # same tokens; only the audio features differ
    assert low.token_ids != high.token_ids


def test_history_and_instructions_grow_the_prompt(voxtral):
    tokenizer = voxtral.processor.tokenizer
    instructions = "You are a friendly phone agent. Answer in one sentence."
    said = "Sure, which day would you like?"
    history = [ChatTurn("user", audio=tone(2.0, 330.0)), ChatTurn("assistant", text=said)]
    params = ReplyParams(max_new_tokens=4)
    alone = voxtral.reply_stream(tone(1.5), [], "", params, seed=3)
    stream = voxtral.reply_stream(tone(1.5), history, instructions, params, seed=3)
    assert stream.prompt_tokens > alone.prompt_tokens + TOKENS_PER_30S
    ids = stream.prompt_ids
    instruction_ids = tokenizer.encode(instructions, add_special_tokens=False)
    # No system prompt: the instructions go in the first user message, once, after its
    # audio (the order of Voxtral's documented examples).
    opening = [BOS, INST, BEGIN_AUDIO, *[AUDIO] * TOKENS_PER_30S]
    assert ids[:len(opening) + len(instruction_ids) + 1] == [*opening, *instruction_ids, END_INST]
    assert tokenizer.decode(ids).count("friendly phone agent") == 1
    # session.instructions_first: before the audio instead.
    first = voxtral.reply_stream(tone(1.5), history, instructions, params, seed=3, instructions_first=True)
    assert first.prompt_ids[:3 + len(instruction_ids)] == [BOS, INST, *instruction_ids, BEGIN_AUDIO]
    assert sorted(first.prompt_ids) == sorted(ids)
    said_ids = tokenizer.encode(said, add_special_tokens=False)
    start = ids.index(END_INST) + 1
    assert ids[start:start + len(said_ids) + 2] == [*said_ids, EOS, INST]
    assert ids.count(BEGIN_AUDIO) == 2 and ids.count(AUDIO) == 2 * TOKENS_PER_30S
    assert len(run(stream)) == 4


def test_reply_prompt_is_the_processors(voxtral):
    """reply_prompt tokenizes as the processor's apply_chat_template does and makes the
    same features, for the audio not yet encoded only."""
    history = [ChatTurn("user", audio=tone(2.0, 330.0)), ChatTurn("assistant", text="Sure.")]
    full = voxtral.processor.apply_chat_template(voxtral.conversation(tone(35.0), history, "Be brief."))
    prompt = voxtral.reply_prompt(tone(35.0), history, "Be brief.")
    assert torch.equal(prompt.input_ids, full["input_ids"])
    assert [a.features.shape[0] for a in prompt.audio] == [1, 2]  # 2 s: one 30 s chunk; 35 s: two
    assert torch.equal(torch.cat([a.features for a in prompt.audio]), full["input_features"])
    remembered = TurnAudio(tone(2.0, 330.0))
    voxtral.encode(voxtral.reply_prompt(remembered, [], "").audio[0])
    again = voxtral.reply_prompt(tone(1.0), [ChatTurn("user", audio=remembered), ChatTurn("assistant", text="Sure.")], "")
    assert again.audio[0] is remembered and remembered.features is None  # not extracted again


def test_remembered_turns_are_encoded_once_with_the_same_tokens(voxtral):
    """A session keeps each turn's TurnAudio: the encoder runs once per turn audio, and a
    reply gets the same tokens as with the history's audio given afresh."""
    params = ReplyParams(max_new_tokens=6)
    turns = [TurnAudio(tone(1.0 + i, 200.0 + 60 * i)) for i in range(4)]
    history: list[ChatTurn] = []
    for i, audio in enumerate(turns):
        stream = voxtral.reply_stream(audio, history, "Be brief.", params, seed=i)
        run(stream)
        assert [t.encodes for t in turns[:i + 1]] == [1] * (i + 1)
        fresh = [ChatTurn(t.role, t.audio.samples if t.audio is not None else None, t.text) for t in history]
        alone = voxtral.reply_stream(audio.samples, fresh, "Be brief.", params, seed=i)
        assert run(alone) and alone.token_ids == stream.token_ids and alone.prompt_ids == stream.prompt_ids
        history += [ChatTurn("user", audio=audio), ChatTurn("assistant", text=stream.text or "ok")]


def test_agent_greeting_first_gets_a_user_message_with_the_instructions(voxtral):
    history = [ChatTurn("assistant", text="Hello, how can I help?")]
    conversation = voxtral.conversation(tone(1.0), history, "Be brief.")
    assert [m["role"] for m in conversation] == ["user", "assistant", "user"]
    assert conversation[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert [c["type"] for c in conversation[2]["content"]] == ["audio"]
    stream = voxtral.reply_stream(tone(1.0), history, "Be brief.", ReplyParams(max_new_tokens=2), seed=0)
    assert len(run(stream)) == 2
    with pytest.raises(InputError, match="role"):
        voxtral.conversation(tone(1.0), [ChatTurn("system", text="x")], "")


def test_long_and_empty_audio(voxtral):
    long = voxtral.reply_stream(tone(35.0), [], "", ReplyParams(max_new_tokens=2), seed=0)
    assert long.prompt_ids.count(AUDIO) == 2 * TOKENS_PER_30S  # two 30 s windows
    assert len(run(long)) == 2
    for samples in (0, int(0.1 * IN_RATE)):
        short = voxtral.reply_stream(tone(samples / IN_RATE), [], "", ReplyParams(max_new_tokens=2), seed=0)
        assert short.prompt_ids.count(AUDIO) == TOKENS_PER_30S
        assert len(run(short)) == 2


def test_close_mid_stream_frees_the_cache(voxtral):
    stream = voxtral.reply_stream(tone(1.5), [], "", ReplyParams(max_new_tokens=50), seed=2)
    stream.step(), stream.step()
    assert stream.holds_cache and not stream.finished
    calls = voxtral.forward_calls
    stream.close()
    assert stream.finished and not stream.holds_cache
    assert stream.step() is None and voxtral.forward_calls == calls and stream.tokens == 2


def test_close_during_a_forward_pass_drops_its_result(voxtral, monkeypatch):
    stream = voxtral.reply_stream(tone(1.5), [], "", ReplyParams(max_new_tokens=50), seed=2)
    stream.step()
    forward = voxtral.forward

    def forward_then_cancel(inputs, cache):
        out = forward(inputs, cache)
        stream.close()  # as the event loop would, while this thread is in the model
        return out

    monkeypatch.setattr(voxtral, "forward", forward_then_cancel)
    assert stream.step() is None
    assert stream.finished and not stream.holds_cache and stream.tokens == 1


def test_a_failed_forward_pass_frees_the_cache(voxtral, monkeypatch):
    stream = voxtral.reply_stream(tone(1.5), [], "", ReplyParams(max_new_tokens=50), seed=2)
    stream.step()

    def out_of_memory(inputs, cache):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(voxtral, "forward", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        stream.step()
    assert stream.finished and not stream.holds_cache and stream.step() is None


def test_prompts_leave_no_audio_in_urllibs_cache(voxtral):
    """mistral-common parses each base64 WAV of a prompt with urlparse, whose cache keeps
    the last 128 arguments: a server's memory grew with its calls until it was full."""
    urllib.parse.urlsplit.cache_clear()
    prompt = voxtral.reply_prompt(tone(2.0), [ChatTurn("user", audio=tone(1.0, 330.0)),
                                              ChatTurn("assistant", text="Sure.")], "Be brief.")
    assert len(prompt.audio) == 2
    assert urllib.parse.urlsplit.cache_info().currsize == 0
    voxtral.transcribe_stream(tone(1.0), "en", ReplyParams(max_new_tokens=1), seed=0)
    assert urllib.parse.urlsplit.cache_info().currsize == 0


def test_transcription(voxtral):
    tokenizer = voxtral.processor.tokenizer
    stream = voxtral.transcribe_stream(tone(3.0), "en", ReplyParams(max_new_tokens=5), seed=0)
    lang = tokenizer.encode("lang:en", add_special_tokens=False)
    # Voxtral's transcription prompt: <s>[INST][BEGIN_AUDIO][AUDIO]...[/INST]lang:en[TRANSCRIBE]
    assert stream.prompt_ids == [BOS, INST, BEGIN_AUDIO, *[AUDIO] * TOKENS_PER_30S, END_INST, *lang, TRANSCRIBE]
    assert len(run(stream)) == 5 and stream.text
    detect = voxtral.transcribe_stream(tone(3.0), None, ReplyParams(max_new_tokens=1), seed=0)
    assert detect.prompt_ids[-2:] == [END_INST, TRANSCRIBE]
    with pytest.raises(InputError):
        voxtral.transcribe_stream(tone(1.0), "no-such-language", ReplyParams(), seed=0)


def test_memory_check_comes_before_the_weights(monkeypatch):
    from transformers import VoxtralConfig

    asked = []

    def refuse(name, needed):
        asked.append((name, needed))
        raise InsufficientVRAMError(f"{name} needs {needed} bytes")

    with pytest.raises(InsufficientVRAMError):
        VoxtralModel.load(str(tiny_voxtral_dir()), torch.device("cpu"), torch.float32, check_memory=refuse)
    tiny_params = sum(p.numel() for p in VoxtralForConditionalGeneration.from_pretrained(
        str(tiny_voxtral_dir())).parameters())
    assert asked and abs(asked[0][1] - 4 * tiny_params) < 0.01 * 4 * tiny_params
    # Voxtral Mini 3B (the defaults of VoxtralConfig) has about 4.7 B parameters.
    assert 9.0e9 < estimate_voxtral_bytes(VoxtralConfig(), torch.bfloat16) < 9.8e9


def test_missing_weights_name_the_model_and_the_way_out(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: patch the constant too, or
    # the Hub id below waits on network retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    missing = str(tmp_path / "no" / "such" / "voxtral")
    with pytest.raises(ModelInitializationError, match=r"no/such/voxtral.*--profile tiny"):
        VoxtralModel.load(missing, torch.device("cpu"), torch.float32)
    # An id no cache can hold, so a real Voxtral download on this machine is never loaded.
    with pytest.raises(ModelInitializationError, match=r"'voice-agent-tests/no-such-voxtral'.*--profile tiny"):
        VoxtralModel.load("voice-agent-tests/no-such-voxtral", torch.device("cpu"), torch.float32)


# -- replies decoded together (ReplyBatcher) ------------------------------------------------

def _reply_batcher(voxtral, slots=2, max_seq_len=1024, prefill_chunk=128):
    from agent.models.voxtral import ReplyBatcher

    return ReplyBatcher(voxtral, slots, max_seq_len, prefill_chunk, cuda_graphs=False)


async def _drain(batcher, streams, max_steps=500):
    import asyncio

    pieces = {id(s): [] for s in streams}
    for _ in range(max_steps):
        if not batcher.has_work():
            break
        batcher.step()
        await asyncio.sleep(0)
    for s in streams:
        while not s.done:
            piece = await asyncio.wait_for(s.next_piece(), 5)
            if piece is not None:
                pieces[id(s)].append(piece)
    return pieces


@pytest.mark.parametrize("whole_prompts", [True, False], ids=["whole-prompts", "chunked-prefill"])
async def test_batched_replies_give_the_tokens_they_give_alone(voxtral, whole_prompts):
    """Three replies share the decode steps (two slots, so one waits; prompts of about 400
    positions fed whole, as the reply engine does, or 128 at a time; one joins late, one is
    shorter and leaves early): each gets exactly the tokens and text of the single path
    with the same seed.

    Greedy (temperature 0): the tiny model's random weights give an almost flat
    distribution over 131k ids, so the 1e-7 differences between a batched and a lone
    forward pass move a sampled draw across an id boundary every few tokens (a real
    model's peaked distribution does not). Argmax gaps are far wider than that, so the
    batching itself (slots, late joins, early leavers, chunked prefill) is what is
    compared; seeded sampling per row is tested in test_sampling.py."""
    import asyncio

    loop = asyncio.get_running_loop()
    batcher = _reply_batcher(voxtral)
    assert batcher.whole_prompts
    batcher.whole_prompts = whole_prompts
    history = [ChatTurn("user", audio=tone(1.0, 330.0)), ChatTurn("assistant", text="Sure.")]
    plans = [(tone(1.5), [], "Be brief.", 12, 3), (tone(2.0, 440.0), history, "", 5, 4), (tone(0.5), [], "", 9, 5)]
    streams = []
    for i, (audio, hist, instructions, max_new, seed) in enumerate(plans):
        prompt = voxtral.reply_prompt(audio, hist, instructions)
        streams.append(batcher.admit(prompt, ReplyParams(temperature=0.0, max_new_tokens=max_new), seed, loop))
        if i == 2:
            assert len(batcher.waiting) == 1  # two slots, both busy
        for _ in range(3 * i):  # the next reply arrives a few steps later
            batcher.step()
    pieces = await _drain(batcher, streams)
    for stream, (audio, hist, instructions, max_new, seed) in zip(streams, plans):
        alone = voxtral.reply_stream(audio, hist, instructions, ReplyParams(temperature=0.0, max_new_tokens=max_new), seed)
        assert "".join(run(alone)) == "".join(pieces[id(stream)]) == stream.text
        assert stream.tokens == alone.token_ids and len(stream.tokens) == max_new
    assert not batcher.has_work() and batcher.active == []


async def test_a_closed_batched_reply_leaves_at_the_next_step(voxtral):
    import asyncio

    loop = asyncio.get_running_loop()
    batcher = _reply_batcher(voxtral, slots=1)
    inputs = voxtral.reply_prompt(tone(1.0), [], "")
    first = batcher.admit(inputs, ReplyParams(max_new_tokens=50), 1, loop)
    second = batcher.admit(inputs, ReplyParams(max_new_tokens=5), 2, loop)
    for _ in range(8):
        batcher.step()
    made = len(first.tokens)
    assert made > 0 and second.slot is None  # one slot: the second waits
    first.close()
    batcher.step()
    assert first.slot is None and len(first.tokens) == made  # no token after the close
    assert second.slot == 0  # took the freed slot in the same step
    await _drain(batcher, [second])
    assert len(second.tokens) == 5


def test_a_prompt_too_long_for_the_reply_engine_takes_the_single_path(models):
    """open_reply batches a reply when its prompt and longest reply fit a slot, and hands
    a longer one to the single path rather than failing the turn."""
    from agent.models.voxtral import BatchedReply, TextStream

    engine = models.replies
    models.replies = _reply_batcher(models.voxtral, slots=1, max_seq_len=512)  # not stepped: admit only
    try:
        params = ReplyParams(max_new_tokens=4)
        fits = models.open_reply(models.voxtral.reply_prompt(tone(1.0), [], ""), params, 0, None)  # 375 + a few
        assert isinstance(fits, BatchedReply) and fits.prompt.shape[0] + 4 <= 511
        fits.close()
        too_long = models.open_reply(models.voxtral.reply_prompt(tone(35.0), [], ""), params, 0, None)  # 750
        assert isinstance(too_long, TextStream) and too_long.prompt_tokens > 511
        assert len(run(too_long)) == 4
    finally:
        models.replies = engine


def test_random_voxtral_mini_is_the_real_architecture_and_runs(voxtral):
    """The orpheus-3b-random profile's Voxtral: VoxtralConfig's defaults (Voxtral Mini) with
    our tekken's audio id; the random-weight builder makes a model that answers (checked on
    the tiny config: the 4.7 B one would take 19 GB of RAM in float32)."""
    from agent.models.tiny import random_voxtral, tiny_voxtral_config, voxtral_mini_config

    mini = voxtral_mini_config()
    assert mini.audio_token_id == AUDIO and mini.text_config.num_hidden_layers == 30
    assert mini.text_config.hidden_size == 3072 and mini.audio_config.num_hidden_layers == 32
    assert 9.0e9 < estimate_voxtral_bytes(mini, torch.bfloat16) < 9.8e9
    model = random_voxtral(tiny_voxtral_config(), torch.device("cpu"), torch.float32)
    assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in model.parameters())
    rotary = model.model.language_model.rotary_emb.inv_freq
    assert rotary.device.type == "cpu" and torch.isfinite(rotary).all() and rotary[0] == 1.0
    randomized = VoxtralModel(model.eval(), voxtral.processor, "random:test")
    stream = randomized.reply_stream(tone(1.0), [], "", ReplyParams(max_new_tokens=3), seed=0)
    assert len(run(stream)) == 3
    # The profile's source goes through the memory check with Voxtral Mini's size first.
    asked = []

    def refuse(name, needed):
        asked.append((name, needed))
        raise InsufficientVRAMError(f"{name} needs {needed} bytes")

    with pytest.raises(InsufficientVRAMError, match="random:voxtral-mini"):
        load_voxtral("random:voxtral-mini", torch.device("cpu"), torch.bfloat16, check_memory=refuse)
    assert asked[0][1] == estimate_voxtral_bytes(mini, torch.bfloat16)
