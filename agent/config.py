"""Settings: config/default.toml, a profile, an optional file, then environment variables.

config/default.toml is the one place that lists every option with its default; the
dataclasses here give each option its type. Anything not in both is rejected.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.toml"
ENV_PREFIX = "VOICE_AGENT_"
# Environment variables with the prefix that are not settings overrides.
ENV_NOT_SETTINGS = {"VOICE_AGENT_PROFILE", "VOICE_AGENT_CACHE"}
DTMF_KEYS = "0123456789*#ABCD"  # the RFC 4733 events a phone keypad sends


@dataclass(frozen=True)
class DeviceSettings:
    """[device]: where the models run and in what precision."""
    device: str
    dtype: str
    headroom_gb: float


@dataclass(frozen=True)
class OrpheusSettings:
    """[orpheus]: the speech model and its sampling."""
    model: str
    temperature: float
    top_p: float
    repetition_penalty: float
    max_tokens: int
    tokens_per_char: float


@dataclass(frozen=True)
class SnacSettings:
    """[snac]: the audio codec model and its streaming decoder."""
    model: str
    decoder_mode: str
    max_frames_per_window: int
    noise: bool


@dataclass(frozen=True)
class TTSSettings:
    """[tts]: voices, sentence pieces, retries."""
    voices: tuple[str, ...]
    default_voice: str
    fallback_voice: str
    max_retries: int
    retry_backoff_s: float
    max_sentence_chars: int
    seed: int


@dataclass(frozen=True)
class EngineSettings:
    """[engine]: the batched speech and reply engines."""
    mode: str
    max_streams: int
    max_seq_len: int
    prefill_chunk: int
    defer_lead_s: float
    cuda_graphs: bool
    reply_slots: int
    reply_max_seq_len: int
    reply_prefill_chunk: int


@dataclass(frozen=True)
class VoxtralSettings:
    """[voxtral]: the listening model and its replies."""
    model: str
    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass(frozen=True)
class VADSettings:
    """[vad]: which frames are speech, and when an utterance starts and ends."""
    engine: str
    threshold: float
    aggressiveness: int
    frame_ms: int
    start_ms: int
    end_ms: int
    preroll_ms: int
    min_utterance_ms: int
    max_utterance_s: float
    snr_db: float
    min_level_db: float


@dataclass(frozen=True)
class TurnSettings:
    """[turn]: deciding that the caller has finished their turn."""
    engine: str
    model: str
    threshold: float
    min_silence_ms: int
    max_silence_ms: int
    preemptive: bool


@dataclass(frozen=True)
class EchoSettings:
    """[echo]: the echo guard on phone lines."""
    guard: str
    max_delay_ms: int
    margin_db: float


@dataclass(frozen=True)
class SessionSettings:
    """[session]: one call's conversation."""
    instructions: str
    instructions_first: bool
    voice: str
    max_history_turns: int
    frame_ms: int
    max_queued_s: float
    min_first_chunk_chars: int
    hangup_digit: str
    transfer_to: str
    transfer_digit: str
    transfer_failed: str
    greeting: str
    idle_prompt: str
    idle_prompt_s: float
    idle_hangup_s: float
    barge_in_ms: int
    resume_after_ms: int


@dataclass(frozen=True)
class ServerSettings:
    """[server]: `voice-agent serve` (HTTP, WebRTC, SIP)."""
    host: str
    port: int
    sip_port: int
    max_calls: int
    max_body_kb: int
    connect_timeout_s: float
    media_timeout_s: float
    max_unconfirmed_per_source: int
    drain_s: float


@dataclass(frozen=True)
class SipSettings:
    """[sip]: the agent's SIP account, for the digest challenges of PBXs, trunks and proxies."""
    username: str
    register: str
    register_expires: int
    password: str = dataclasses.field(repr=False)  # never in a log line or a repr


@dataclass(frozen=True)
class RunSettings:
    """[run]: `voice-agent run`."""
    max_input_s: float


@dataclass(frozen=True)
class RecordsSettings:
    """[records]: what is kept of each call (transcripts, call records, recordings)."""
    transcribe: bool
    transcribe_tokens: int
    language: str
    path: str
    keep: int
    audio: bool
    audio_dir: str


@dataclass(frozen=True)
class TracingSettings:
    """[tracing]: OpenTelemetry traces of calls and turns (OTEL_* variables also turn them on)."""
    enabled: bool
    exporter: str
    service_name: str


@dataclass(frozen=True)
class MonitorSettings:
    """[monitor]: latency targets that log a warning when missed."""
    ttft_ms_target: float
    ttfa_ms_target: float
    rtf_target: float


@dataclass(frozen=True)
class Settings:
    """All settings: config/default.toml, a profile, a file and the environment, validated."""
    profile: str
    device: DeviceSettings
    orpheus: OrpheusSettings
    snac: SnacSettings
    tts: TTSSettings
    engine: EngineSettings
    voxtral: VoxtralSettings
    vad: VADSettings
    turn: TurnSettings
    echo: EchoSettings
    session: SessionSettings
    server: ServerSettings
    sip: SipSettings
    run: RunSettings
    records: RecordsSettings
    tracing: TracingSettings
    monitor: MonitorSettings

    def replace(self, section: str, **changes: Any) -> Settings:
        """A copy with some options of one section changed (validated like a file)."""
        merged = dataclasses.asdict(self)
        merged.pop("profile")
        merged[section].update(changes)
        return _build(merged, self.profile, source="override")


SECTIONS: dict[str, type] = {
    "device": DeviceSettings,
    "orpheus": OrpheusSettings,
    "snac": SnacSettings,
    "tts": TTSSettings,
    "engine": EngineSettings,
    "voxtral": VoxtralSettings,
    "vad": VADSettings,
    "turn": TurnSettings,
    "echo": EchoSettings,
    "session": SessionSettings,
    "server": ServerSettings,
    "sip": SipSettings,
    "run": RunSettings,
    "records": RecordsSettings,
    "tracing": TracingSettings,
    "monitor": MonitorSettings,
}

# Checks beyond the type: (test, what a good value looks like).
_CHOICES = {
    "device.dtype": ("auto", "bfloat16", "float16", "float32"),
    "snac.decoder_mode": ("default", "baseline"),
    "engine.mode": ("batched", "single"),
    "vad.engine": ("silero", "webrtc"),
    "vad.aggressiveness": (0, 1, 2, 3),
    "vad.frame_ms": (10, 20, 30),
    "session.frame_ms": (10, 20, 30, 40, 60),
    "echo.guard": ("auto", "on", "off"),
    "turn.engine": ("smart_turn", "silence"),
    "tracing.exporter": ("otlp", "console"),
}
_RANGES = {
    "device.headroom_gb": (0.0, None),
    "orpheus.temperature": (0.0, 10.0),
    "orpheus.top_p": (1e-6, 1.0),
    "orpheus.repetition_penalty": (1.0, 10.0),
    "orpheus.max_tokens": (7, 100_000),
    "orpheus.tokens_per_char": (0.01, 100.0),
    "snac.max_frames_per_window": (1, 256),
    "tts.max_retries": (0, 100),
    "tts.retry_backoff_s": (0.0, 60.0),
    "tts.max_sentence_chars": (20, 100_000),
    "tts.seed": (-1, 2**63 - 1),
    "engine.max_streams": (1, 4096),
    "engine.max_seq_len": (64, 131_072),
    "engine.prefill_chunk": (16, 131_072),
    "engine.defer_lead_s": (0.0, 600.0),
    "engine.reply_slots": (1, 4096),
    "engine.reply_max_seq_len": (64, 131_072),
    "engine.reply_prefill_chunk": (16, 131_072),
    "voxtral.temperature": (0.0, 10.0),
    "voxtral.top_p": (1e-6, 1.0),
    "voxtral.max_new_tokens": (1, 100_000),
    "vad.threshold": (0.05, 0.95),
    "vad.start_ms": (10, 10_000),
    "vad.end_ms": (10, 10_000),
    "vad.preroll_ms": (0, 10_000),
    "vad.min_utterance_ms": (0, 60_000),
    "vad.max_utterance_s": (1.0, 600.0),
    "vad.snr_db": (0.0, 60.0),
    "vad.min_level_db": (-120.0, 0.0),
    "turn.threshold": (0.0, 1.0),
    "turn.min_silence_ms": (20, 5_000),
    "turn.max_silence_ms": (100, 30_000),
    "echo.max_delay_ms": (20, 2000),
    "echo.margin_db": (0.0, 40.0),
    "session.max_history_turns": (0, 1000),
    "session.max_queued_s": (0.1, 600.0),
    "session.min_first_chunk_chars": (1, 10_000),
    "session.idle_prompt_s": (0.0, 86_400.0),
    "session.barge_in_ms": (0, 10_000),
    "session.resume_after_ms": (20, 10_000),
    "session.idle_hangup_s": (0.0, 86_400.0),
    "server.port": (0, 65535),
    "server.sip_port": (0, 65535),
    "server.max_calls": (1, 10_000),
    "server.max_body_kb": (1, 100_000),
    "server.connect_timeout_s": (1.0, 600.0),
    "server.media_timeout_s": (1.0, 3600.0),
    "server.max_unconfirmed_per_source": (1, 10_000),
    "server.drain_s": (0.0, 86_400.0),
    "run.max_input_s": (1.0, 86_400.0),
    "sip.register_expires": (10, 86_400),
    "records.transcribe_tokens": (1, 100_000),
    "records.keep": (0, 1_000_000),
    "monitor.ttft_ms_target": (0.0, None),
    "monitor.ttfa_ms_target": (0.0, None),
    "monitor.rtf_target": (0.0, None),
}


def load_settings(
    profile: str | None = None,
    config_file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read the settings; raise ConfigError naming the key on any unknown key or bad value."""
    env = os.environ if env is None else env
    base = _read_toml(DEFAULT_CONFIG)
    profiles = base.pop("profiles", {})
    profile = profile or env.get(ENV_PREFIX + "PROFILE") or "default"
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r} (choose from: {', '.join(sorted(profiles))})")
    _merge(base, profiles[profile], "profiles." + profile)
    if config_file is not None:
        user = _read_toml(Path(config_file))
        user.pop("profiles", None)
        _merge(base, user, str(config_file))
    _merge(base, _env_overrides(env), "environment")
    return _build(base, profile, source="settings")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def _merge(base: dict[str, Any], over: Mapping[str, Any], source: str) -> None:
    for section, values in over.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown settings section {section!r} in {source}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section!r} in {source} must be a table")
        known = {f.name for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown setting {section}.{key} in {source}")
            base.setdefault(section, {})[key] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        rest = name[len(ENV_PREFIX):]
        if "__" not in rest:
            raise ConfigError(f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        section, key = (part.lower() for part in rest.split("__", 1))
        out.setdefault(section, {})[key] = _parse_env_value(raw)
    return out


def _parse_env_value(raw: str) -> Any:
    # A TOML value where it parses (numbers, booleans, lists), the plain text otherwise.
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _build(merged: dict[str, Any], profile: str, source: str) -> Settings:
    sections = {}
    for section, cls in SECTIONS.items():
        values = merged.get(section, {})
        kwargs = {}
        for f in fields(cls):
            key = f"{section}.{f.name}"
            if f.name not in values:
                raise ConfigError(f"setting {key} is missing from {source}")
            # from __future__ import annotations: a dataclass field's type is its source text
            assert isinstance(f.type, str)
            kwargs[f.name] = _check(key, f.type, values[f.name])
        sections[section] = cls(**kwargs)
    settings = Settings(profile=profile, **sections)
    _check_cross(settings)
    return settings


def _check(key: str, type_name: str, value: Any) -> Any:
    if type_name == "bool":
        ok = isinstance(value, bool)
    elif type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif type_name == "str":
        ok = isinstance(value, str)
    else:  # tuple[str, ...]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"setting {key} must be {type_name.replace('tuple[str, ...]', 'a list of strings')}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"setting {key} must be one of {', '.join(map(str, _CHOICES[key]))}; got {value!r}")
    if key in _RANGES:
        low, high = _RANGES[key]
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"setting {key} must be {bound}; got {value!r}")
    return value


def _check_cross(s: Settings) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", s.device.device):
        raise ConfigError(f"setting device.device must be auto, cpu, cuda or cuda:N (one GPU); got {s.device.device!r}")
    if not s.tts.voices:
        raise ConfigError("setting tts.voices must name at least one voice")
    if s.tts.default_voice not in s.tts.voices:
        raise ConfigError(f"setting tts.default_voice {s.tts.default_voice!r} is not in tts.voices")
    if s.tts.fallback_voice and s.tts.fallback_voice not in s.tts.voices:
        raise ConfigError(f"setting tts.fallback_voice {s.tts.fallback_voice!r} is not in tts.voices")
    if s.session.hangup_digit and (len(s.session.hangup_digit) != 1 or s.session.hangup_digit not in DTMF_KEYS):
        raise ConfigError(f"setting session.hangup_digit must be one key of {DTMF_KEYS} or \"\" (off); "
                          f"got {s.session.hangup_digit!r}")
    if s.session.transfer_digit and (len(s.session.transfer_digit) != 1 or s.session.transfer_digit not in DTMF_KEYS
                                     or s.session.transfer_digit == s.session.hangup_digit):
        raise ConfigError(f"setting session.transfer_digit must be one key of {DTMF_KEYS} other than "
                          f"session.hangup_digit, or \"\" (off); got {s.session.transfer_digit!r}")
    if s.session.transfer_digit and not s.session.transfer_to.startswith("sip:"):
        raise ConfigError(f"setting session.transfer_digit needs session.transfer_to, a sip: URI; "
                          f"got {s.session.transfer_to!r}")
    if s.session.voice and s.session.voice not in s.tts.voices:
        raise ConfigError(f"setting session.voice {s.session.voice!r} is not in tts.voices")
    if s.turn.engine == "smart_turn" and s.turn.min_silence_ms >= s.turn.max_silence_ms:
        raise ConfigError(f"setting turn.min_silence_ms ({s.turn.min_silence_ms}) must be below turn.max_silence_ms "
                          f"({s.turn.max_silence_ms})")
    if s.session.idle_prompt_s and s.session.idle_hangup_s and s.session.idle_hangup_s <= s.session.idle_prompt_s:
        raise ConfigError(f"setting session.idle_hangup_s ({s.session.idle_hangup_s:g}) must be above "
                          f"session.idle_prompt_s ({s.session.idle_prompt_s:g}), or 0 (off)")
    if s.orpheus.max_tokens % 7:
        raise ConfigError(f"setting orpheus.max_tokens must be a multiple of 7 (one frame); got {s.orpheus.max_tokens}")
