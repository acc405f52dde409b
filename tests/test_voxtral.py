"""Voxtral through the real processor and model classes, on the tiny checkpoint."""

import json

import numpy as np
import pytest
import torch
from transformers import VoxtralForConditionalGeneration

from agent.errors import InputError, InsufficientVRAMError, ModelInitializationError
from agent.tiny import tiny_voxtral_dir
from agent.voxtral import (SAMPLE_RATE, ChatTurn, ReplyParams, VoxtralModel, estimate_voxtral_bytes)

AUDIO, BEGIN_AUDIO, TRANSCRIBE, BOS, EOS, INST, END_INST = 24, 25, 34, 1, 2, 3, 4
TOKENS_PER_30S = 375


@pytest.fixture(scope="module")
def voxtral() -> VoxtralModel:
    return VoxtralModel.load(str(tiny_voxtral_dir()), torch.device("cpu"), torch.float32)


def tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
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
    assert features["feature_size"] == 128 and features["sampling_rate"] == SAMPLE_RATE
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
    # No system prompt: the instructions open the first user message, once.
    assert ids[:2 + len(instruction_ids)] == [BOS, INST, *instruction_ids]
    assert tokenizer.decode(ids).count("friendly phone agent") == 1
    said_ids = tokenizer.encode(said, add_special_tokens=False)
    start = ids.index(END_INST) + 1
    assert ids[start:start + len(said_ids) + 2] == [*said_ids, EOS, INST]
    assert ids.count(BEGIN_AUDIO) == 2 and ids.count(AUDIO) == 2 * TOKENS_PER_30S
    assert len(run(stream)) == 4


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
    for samples in (0, int(0.1 * SAMPLE_RATE)):
        short = voxtral.reply_stream(tone(samples / SAMPLE_RATE), [], "", ReplyParams(max_new_tokens=2), seed=0)
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
