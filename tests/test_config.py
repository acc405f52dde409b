"""Settings: defaults, profiles, files, environment, and errors that name the key."""

import dataclasses
import tomllib

import pytest

from agent.config import DEFAULT_CONFIG, SECTIONS, load_settings
from agent.errors import ConfigError


def test_every_option_is_in_default_toml():
    data = tomllib.loads(DEFAULT_CONFIG.read_text())
    for section, cls in SECTIONS.items():
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_defaults_and_profiles():
    s = load_settings(env={})
    assert s.profile == "default"
    assert s.orpheus.model == "canopylabs/orpheus-3b-0.1-ft" and s.snac.model == "hubertsiuzdak/snac_24khz"
    assert (s.orpheus.temperature, s.orpheus.top_p, s.orpheus.repetition_penalty) == (0.6, 0.8, 1.1)
    assert s.tts.voices == ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")
    tiny = load_settings(env={"VOICE_AGENT_PROFILE": "tiny"})
    assert tiny.profile == "tiny" and tiny.orpheus.model == "tiny"
    assert load_settings("default", env={"VOICE_AGENT_PROFILE": "tiny"}).profile == "default"


def test_file_and_environment_override(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text('[orpheus]\ntemperature = 0.3\n[tts]\ndefault_voice = "leo"\n')
    s = load_settings("tiny", f, env={"VOICE_AGENT_ORPHEUS__TOP_P": "0.9", "VOICE_AGENT_SNAC__NOISE": "false"})
    assert s.orpheus.temperature == 0.3 and s.tts.default_voice == "leo"
    assert s.orpheus.top_p == 0.9 and s.snac.noise is False
    s = load_settings("tiny", f, env={"VOICE_AGENT_ORPHEUS__TEMPERATURE": "0.5", "VOICE_AGENT_CACHE": "/tmp/x"})
    assert s.orpheus.temperature == 0.5  # the environment wins over the file


@pytest.mark.parametrize("text, key", [
    ("[orpheus]\ntemprature = 0.3\n", "orpheus.temprature"),
    ("[orphus]\ntemperature = 0.3\n", "orphus"),
    ('[orpheus]\ntemperature = "hot"\n', "orpheus.temperature"),
    ("[orpheus]\ntop_p = 1.5\n", "orpheus.top_p"),
    ("[orpheus]\nmax_tokens = 100\n", "orpheus.max_tokens"),
    ('[snac]\ndecoder_mode = "fast"\n', "snac.decoder_mode"),
    ('[tts]\ndefault_voice = "bob"\n', "tts.default_voice"),
    ('[device]\ndevice = "tpu"\n', "device.device"),
    ("[snac]\nnoise = 1\n", "snac.noise"),
])
def test_bad_file_names_the_key(tmp_path, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(None, f, env={})


def test_bad_environment_names_the_key():
    with pytest.raises(ConfigError, match=r"orpheus\.temperature"):
        load_settings(env={"VOICE_AGENT_ORPHEUS__TEMPERATURE": "warm"})
    with pytest.raises(ConfigError, match="VOICE_AGENT_ORPHEUS_TOP_P"):
        load_settings(env={"VOICE_AGENT_ORPHEUS_TOP_P": "0.9"})  # one underscore: a typo
    with pytest.raises(ConfigError, match=r"orpheus\.nonsense"):
        load_settings(env={"VOICE_AGENT_ORPHEUS__NONSENSE": "1"})
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_settings(env={"VOICE_AGENT_PROFILE": "huge"})


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(None, tmp_path / "missing.toml", env={})
    f = tmp_path / "broken.toml"
    f.write_text("[orpheus\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(None, f, env={})


@pytest.mark.parametrize("key", ["VOICE_AGENT_VAD__AGGRESSIVENESS", "VOICE_AGENT_VAD__FRAME_MS",
                                 "VOICE_AGENT_SESSION__FRAME_MS"])
def test_a_value_outside_numeric_choices_is_a_config_error(key):
    """Choices that are numbers are listed in the message too (it used to raise TypeError)."""
    with pytest.raises(ConfigError, match=r"must be one of .*\d, \d.*; got 5"):
        load_settings("tiny", env={key: "5"})


@pytest.mark.parametrize(("changes", "problem"), [
    ({"transfer_digit": "12"}, "transfer_digit must be one key"),
    ({"transfer_digit": "#", "hangup_digit": "#", "transfer_to": "sip:a@b"}, "other than session.hangup_digit"),
    ({"transfer_digit": "0"}, "needs session.transfer_to, a sip: URI"),
])
def test_transfer_settings_are_checked(changes, problem):
    with pytest.raises(ConfigError, match=problem):
        load_settings("tiny", env={}).replace("session", **changes)


def test_device_takes_one_gpu_by_number():
    from agent.models.memory import resolve_device

    assert load_settings("tiny", env={"VOICE_AGENT_DEVICE__DEVICE": "cuda:1"}).device.device == "cuda:1"
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda or cuda:N"):
        load_settings("tiny", env={"VOICE_AGENT_DEVICE__DEVICE": "gpu1"})
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:0' but no CUDA GPU is available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ConfigError, match="this machine has"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
