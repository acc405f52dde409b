"""The `voice-agent` command.

Exit status: 0 on success, 2 for bad input or settings (one line on stderr, no
traceback), 1 when a model cannot be loaded, speech generation fails or a call cannot be
placed (rejected, not answered).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.config import Settings, load_settings
from agent.errors import ConfigError, InputError, VoiceAgentError

if TYPE_CHECKING:
    from agent.call.factory import SessionFactory
    from agent.models.monitor import RequestMetrics

log = logging.getLogger("voice-agent")


@contextmanager
def loaded_sessions(settings: Settings) -> Iterator[SessionFactory]:
    """The models loaded (progress on stderr), as the transports see them: a SessionFactory.
    Unloaded at the end."""
    from agent.call.factory import SessionFactory
    from agent.models.manager import UnifiedModelManager

    models = UnifiedModelManager(settings)
    try:
        models.load()
        yield SessionFactory(models)
    finally:
        models.unload()


@contextmanager
def traced(settings: Settings) -> Iterator[None]:
    """OpenTelemetry traces of the calls, when [tracing] or OTEL_* variables ask for them
    (agent/call/tracing.py); the spans still queued are exported at the end."""
    from agent.call.tracing import configure_tracing

    provider = configure_tracing(settings.tracing)
    try:
        yield
    finally:
        if provider is not None:
            provider.shutdown()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", help="settings profile: default (real weights) or tiny (offline, random weights)")
    common.add_argument("--config", metavar="FILE", help="a TOML file overriding config/default.toml")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(prog="voice-agent", description="A realtime voice agent: Voxtral listens, Orpheus answers aloud.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    say = sub.add_parser("say", parents=[common], help="speak TEXT with Orpheus into a WAV file or stdout")
    say.add_argument("text", metavar="TEXT")
    say.add_argument("--voice", help="voice name (default: tts.default_voice)")
    say.add_argument("--seed", type=int, help="sampling seed, for repeatable output")
    say.add_argument("-o", "--output", default="speech.wav",
                     help="WAV file to write (24 kHz mono 16-bit), or - for raw s16le PCM on stdout as it is made")
    say.add_argument("--json", action="store_true", help="print one JSON object with the request's metrics")

    run = sub.add_parser("run", parents=[common], help="play a recording as the caller and answer it (headless call)")
    run.add_argument("--input", required=True, metavar="CALL.wav", help="the caller's audio (any rate or channel count)")
    run.add_argument("-o", "--output", metavar="OUT.wav",
                     help="write the call as a 24 kHz stereo WAV: left the caller, right the agent")
    run.add_argument("--realtime", action="store_true", help="pace the whole run at real time")
    run.add_argument("--seed", type=int, help="sampling seed, for repeatable output")
    run.add_argument("--json", action="store_true", help='print {"turns": [...]} with text and latencies')

    serve = sub.add_parser("serve", parents=[common], help="answer browser calls (WebRTC) with the web client")
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="HTTP port (default: server.port)")
    serve.add_argument("--sip-port", type=int, help="SIP port; 0 turns SIP off (default: server.sip_port)")
    serve.add_argument("--device", help="where the models run: auto, cpu, cuda or cuda:N, one GPU "
                                        "(default: device.device)")

    call = sub.add_parser("call", parents=[common], help="place a SIP call (UDP) and let the agent talk on it")
    call.add_argument("uri", metavar="sip:USER@HOST[:PORT]", help="who to call (port 5060 unless given)")
    call.add_argument("--voice", help="the agent's voice (default: session.voice or tts.default_voice)")
    call.add_argument("--max-seconds", type=float, metavar="S", help="hang up after S seconds of conversation")
    call.add_argument("--local-host", metavar="H",
                      help="this host's IP address to call from (default: the one the route to HOST uses)")

    models = sub.add_parser("models", parents=[common],
                            help="each model of the profile: source, size, cached, reachable and accessible")
    models.add_argument("--download", action="store_true",
                        help="download every model that is not fully cached (progress on stderr)")
    models.add_argument("--json", action="store_true", help="print one JSON object")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    snac = bench_sub.add_parser("snac", parents=[common], help="streaming SNAC decoder: baseline vs default mode")
    snac.add_argument("--seconds", type=float, default=10.0, help="audio to decode (default 10)")
    snac.add_argument("--token-rate", type=float, default=150.0,
                      help="simulated generation speed in tokens/s (82 is real time; default 150)")
    snac.add_argument("--json", action="store_true", help="print one JSON line")
    pipeline = bench_sub.add_parser("pipeline", parents=[common],
                                    help="the call pipeline's own overhead per turn (outside the models)")
    pipeline.add_argument("--input", metavar="CALL.wav", help="caller audio (default: the test fixtures, two questions)")
    pipeline.add_argument("--json", action="store_true", help="print one JSON line")
    webrtc = bench_sub.add_parser("webrtc", parents=[common],
                                  help="loopback WebRTC calls: pacing, reply latency, calls at once")
    webrtc.add_argument("--turns", type=int, default=4, help="questions asked for the latency figures (default 4)")
    webrtc.add_argument("--max-calls", type=int, default=64, help="the most calls tried at once (default 64)")
    webrtc.add_argument("--json", action="store_true", help="print one JSON line")
    sip = bench_sub.add_parser("sip", parents=[common], help="a loopback SIP call: RTP pacing, reply latency")
    sip.add_argument("--turns", type=int, default=4, help="questions asked (default 4)")
    sip.add_argument("--json", action="store_true", help="print one JSON line")
    soak = bench_sub.add_parser("soak", parents=[common],
                                help="many calls one after another to a served agent: memory, threads, descriptors per call")
    soak.add_argument("--calls", type=int, default=100, help="calls placed, one after another (default 100)")
    soak.add_argument("--warmup", type=int, help="calls left out of the per-call figures (default: a fifth, at least 5)")
    soak.add_argument("--transport", choices=("webrtc", "sip"), default="webrtc", help="how the calls arrive (default webrtc)")
    soak.add_argument("--json", action="store_true", help="print one JSON line")
    turns = bench_sub.add_parser("turns", parents=[common],
                                 help="turn-taking: end of speech to turn decided, cut-offs, CPU, per detector setting")
    turns.add_argument("--replies", type=int, default=5, metavar="N",
                       help="finished sentences also played as calls, for the time to the first reply audio (default 5; 0 skips)")
    turns.add_argument("--json", action="store_true", help="print one JSON line")
    tts = bench_sub.add_parser("tts", parents=[common],
                               help="one speech stream: transformers' generate vs the single path vs the engine")
    tts.add_argument("--runs", type=int, default=5, help="requests per variant (default 5)")
    tts.add_argument("--tokens", type=int, default=700, help="audio tokens per request, a multiple of 7 (default 700)")
    tts.add_argument("--json", action="store_true", help="print one JSON line")
    streams = bench_sub.add_parser("streams", parents=[common],
                                   help="concurrent speech streams: the most that stay real time, and their first audio")
    streams.add_argument("--levels", metavar="N,N,...", help="stream counts to try, up to 1024 (default 1,2,4,8,16,32,48,64,96,128); the "
                         "engine is sized for the largest plus one slot for the new replies")
    streams.add_argument("--tokens", type=int, default=700, help="audio tokens per sentence, a multiple of 7 (default 700)")
    streams.add_argument("--probes", type=int, default=5, help="new replies timed at each level (default 5)")
    streams.add_argument("--json", action="store_true", help="print one JSON line")
    replies = bench_sub.add_parser("replies", parents=[common],
                                   help="Voxtral replies to many callers at once: the single path vs the reply engine")
    replies.add_argument("--levels", metavar="N,N,...", help="replies at once to try, up to 1024 (default 1,2,4,8)")
    replies.add_argument("--tokens", type=int, default=32, help="tokens per reply (default 32)")
    replies.add_argument("--history", type=int, default=0, metavar="N",
                         help="also time one reply after N remembered turns, their encodings kept or redone")
    replies.add_argument("--json", action="store_true", help="print one JSON line")
    return parser


def main(argv: list[str] | None = None) -> int:
    from agent.process import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread starts (see agent/process.py)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        settings = load_settings(args.profile, args.config)
        if args.command == "say":
            return cmd_say(args, settings)
        if args.command in ("run", "serve", "call"):  # the commands that hold calls
            with traced(settings):
                return {"run": cmd_run, "serve": cmd_serve, "call": cmd_call}[args.command](args, settings)
        if args.command == "models":
            return cmd_models(args, settings)
        if args.command == "bench" and args.bench == "snac":
            return cmd_bench_snac(args, settings)
        if args.command == "bench" and args.bench == "pipeline":
            return cmd_bench_pipeline(args, settings)
        if args.command == "bench" and args.bench == "webrtc":
            return cmd_bench_webrtc(args, settings)
        if args.command == "bench" and args.bench == "sip":
            return cmd_bench_sip(args, settings)
        if args.command == "bench" and args.bench == "soak":
            return cmd_bench_soak(args, settings)
        if args.command == "bench" and args.bench == "turns":
            return cmd_bench_turns(args, settings)
        if args.command == "bench" and args.bench in ("tts", "streams", "replies"):
            return cmd_bench_engine(args, settings)
    except (InputError, ConfigError) as e:
        print(f"voice-agent: error: {e}", file=sys.stderr)
        return 2
    except VoiceAgentError as e:
        print(f"voice-agent: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def cmd_say(args: argparse.Namespace, settings: Settings) -> int:
    from agent.models.manager import UnifiedModelManager
    from agent.models.tts import TTSServiceDirect

    to_stdout = args.output == "-"
    if to_stdout and args.json:
        raise InputError("--json prints to stdout, so it cannot be used with -o - (raw audio on stdout)")
    # Check what can be checked before loading models (seconds to minutes).
    TTSServiceDirect.validate_text(args.text)
    if (args.voice or settings.tts.default_voice) not in settings.tts.voices:
        raise InputError(f"unknown voice {args.voice!r}; choose from: {', '.join(settings.tts.voices)}")
    if not to_stdout:
        _check_writable(args.output)
    _preflight(settings, listen=False)

    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)  # SNAC's decoder noise draws from the global generator
    models = UnifiedModelManager(settings)
    chunks: list[np.ndarray] = []
    metrics: RequestMetrics | None = None

    async def run() -> None:
        nonlocal metrics
        service = models.tts
        assert service is not None  # models.load() ran first
        metrics = service.monitor.start(args.voice or settings.tts.default_voice, args.text)
        async for chunk in service.synthesize(args.text, args.voice, args.seed, metrics):
            if to_stdout:
                sys.stdout.buffer.write(chunk.tobytes())
                sys.stdout.buffer.flush()
            else:
                chunks.append(chunk)

    try:
        models.load(listen=False)
        asyncio.run(run())
    finally:
        models.unload()
    if not to_stdout:
        from agent.audio import write_wav
        from agent.rates import OUT_RATE

        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        write_wav(args.output, audio, OUT_RATE)
        log.info("wrote %.2f s of audio to %s", len(audio) / OUT_RATE, args.output)
    if args.json:
        assert metrics is not None  # set by run()
        print(json.dumps(metrics.to_dict()))
    return 0


def _check_writable(path: str) -> None:
    """Fail before the models load, not after the work is done."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise InputError(f"cannot write {path!r}: it is a directory")
    if not folder.is_dir():
        raise InputError(f"cannot write {path!r}: no such directory {str(folder)!r}")
    if not os.access(target if target.exists() else folder, os.W_OK):
        raise InputError(f"cannot write {path!r}: permission denied")


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from contextlib import nullcontext

    from agent.audio import WavWriter, read_audio
    from agent.call.events import summarize_turns
    from agent.rates import IN_RATE, OUT_RATE
    from signaling.headless import run_call

    # Bad input fails before the models load.
    # run.max_input_s counts the decoded audio (not the header's claim) and stops decoding past it.
    caller_16k = read_audio(args.input, IN_RATE, settings.run.max_input_s)
    caller_24k = read_audio(args.input, OUT_RATE, settings.run.max_input_s)
    if args.output:
        _check_writable(args.output)
    _preflight(settings)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    with loaded_sessions(settings) as sessions:
        # The recording is written as the call goes, not held in memory to the end.
        with WavWriter(args.output, OUT_RATE, 2) if args.output else nullcontext() as recording:
            result = asyncio.run(run_call(sessions, caller_16k, caller_24k, settings, args.realtime, args.seed,
                                          recording, party={"input": str(args.input)}))
    if recording is not None:
        log.info("wrote the call (%.1f s, left caller, right agent) to %s", recording.frames / OUT_RATE, args.output)
    turns = [t.to_dict() for t in result.turns]
    if args.json:
        print(json.dumps({"call_id": result.record.id, "input_s": round(result.input_s, 3), "turns": turns,
                          "latency_ms": summarize_turns([t["latency_ms"] for t in turns])}))
    else:
        for t in turns:
            state = "error: " + t["error"] if t["error"] else ("interrupted" if t["interrupted"] else "answered")
            print(f"turn {t['index']}: caller {t['start']:.2f}-{t['end']:.2f} s, {state}, "
                  f"first audio {t['latency_ms']['first_frame_queued']} ms after speech: {t['reply']!r}")
        if not turns:
            print("no speech found: 0 turns")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from agent.call.factory import SessionFactory
    from agent.models.manager import UnifiedModelManager
    from signaling.server import serve

    if args.device:
        settings = settings.replace("device", device=args.device)  # checked like the setting

    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    sip_port = settings.server.sip_port if args.sip_port is None else args.sip_port
    if not 0 < port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {port}")
    if not 0 <= sip_port < 65536:
        raise InputError(f"--sip-port must be between 0 (off) and 65535, got {sip_port}")
    if settings.sip.register:
        from signaling.sip.register import parse_registrar

        if not sip_port:
            raise InputError("sip.register needs SIP: give --sip-port N (or server.sip_port)")
        try:
            parse_registrar(settings.sip.register)
        except ValueError as e:
            raise InputError(str(e)) from None
    _preflight(settings)
    models = UnifiedModelManager(settings)  # loaded by serve() while the page already answers
    try:
        serve(SessionFactory(models), models.load, settings, host, port, sip_port)
    finally:
        models.unload()
    return 0


def cmd_call(args: argparse.Namespace, settings: Settings) -> int:
    from signaling.sip.client import call_out, check_local_host, local_address_for, parse_target

    # Bad input fails before the models load.
    uri, peer = parse_target(args.uri)
    if (args.voice or settings.session.voice or settings.tts.default_voice) not in settings.tts.voices:
        raise InputError(f"unknown voice {args.voice!r}; choose from: {', '.join(settings.tts.voices)}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise InputError(f"--max-seconds must be positive, got {args.max_seconds}")
    local_host = check_local_host(args.local_host) if args.local_host else local_address_for(peer)
    _preflight(settings)

    async def run() -> None:
        stop = asyncio.Event()  # Ctrl-C or SIGTERM: hang up (or stop ringing) and exit
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await call_out(sessions, settings, uri, peer, local_host, voice=args.voice, max_seconds=args.max_seconds,
                       stop=stop, say=lambda line: print(line, flush=True))

    with loaded_sessions(settings) as sessions:
        asyncio.run(run())
    return 0


def _preflight(settings: Settings, listen: bool = True) -> None:
    """Stop at once when a call could not be kept (InputError, exit 2: records.path or
    records.audio_dir not writable) or a model cannot be had (ModelInitializationError,
    exit 1: gated, unknown, no network, not cached). Nothing is downloaded or loaded
    before this."""
    from agent.call.records import CallRecords
    from agent.models.preflight import require_models

    if listen:
        CallRecords(settings.records).check()
    require_models(settings, listen)


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    """voice-agent models [--download]: exit 0 when every model can be loaded, else 1."""
    from agent.models.preflight import check_models, download, report_lines

    checks = check_models(settings)
    if args.download:
        download(checks)
        checks = check_models(settings)
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"profile": settings.profile, "ok": ok, "models": [c.to_dict() for c in checks]}))
    else:
        print(f"profile {settings.profile}:")
        print("\n".join(report_lines(checks)))
    return 0 if ok else 1


def cmd_bench_pipeline(args: argparse.Namespace, settings: Settings) -> int:
    from agent.audio import read_audio
    from agent.bench import FIXTURES
    from agent.rates import IN_RATE, OUT_RATE
    from signaling.bench import bench_pipeline

    if args.input is None:  # the two fixture questions, with a caller's gaps
        gap = np.zeros(int(IN_RATE * 4.0), dtype=np.int16)
        parts = [read_audio(FIXTURES / name, IN_RATE) for name in ("question1.wav", "question2.wav")]
        caller, caller_24k = np.concatenate([gap[:IN_RATE], parts[0], gap, parts[1], gap]), np.zeros(0, np.int16)
    else:
        caller, caller_24k = read_audio(args.input, IN_RATE), read_audio(args.input, OUT_RATE)
    with loaded_sessions(settings) as sessions:
        result = bench_pipeline(sessions, settings, caller, caller_24k)
    print(json.dumps(result) if args.json else result)
    return 0


def cmd_bench_turns(args: argparse.Namespace, settings: Settings) -> int:
    """voice-agent bench turns: the detector settings side by side on the turn recordings."""
    from agent.bench import TURN_VARIANTS, bench_turns, load_turn_recordings, turn_variant
    from signaling.bench import bench_turn_replies

    if args.replies < 0:
        raise InputError(f"--replies must be 0 or more, got {args.replies}")
    recordings = load_turn_recordings()
    log.info("deciding turns on %d recordings, %d settings...", len(recordings), len(TURN_VARIANTS))
    result = bench_turns(settings, recordings)
    if args.replies:
        complete = [r for r in recordings if r.kind == "complete"][:args.replies]
        variants = [(name, turn_variant(settings, vad, turn)) for name, vad, turn in TURN_VARIANTS]
        log.info("playing %d finished sentences as calls per setting...", len(complete))
        with loaded_sessions(settings) as sessions:
            for name, reply in bench_turn_replies(sessions, settings, variants, complete).items():
                result["variants"][name]["reply"] = reply
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


def cmd_bench_engine(args: argparse.Namespace, settings: Settings) -> int:
    """voice-agent bench tts | streams | replies"""
    from agent.bench import bench_replies, bench_streams, bench_tts

    if args.bench != "tts" and settings.engine.mode != "batched":
        raise InputError(f"bench {args.bench} measures the batched engine; set engine.mode = \"batched\"")
    if args.bench == "replies":
        if not 2 <= args.tokens <= 4096:
            raise InputError("--tokens must be between 2 and 4096")
        if not 0 <= args.history <= 100:
            raise InputError("--history must be between 0 and 100")
        result = bench_replies(settings, _levels(args), args.tokens, args.history)
    else:
        if args.tokens < 28 or args.tokens % 7:
            raise InputError("--tokens must be a multiple of 7, at least 28 (the baseline's first audio)")
        if args.bench == "tts":
            if args.runs < 1:
                raise InputError("--runs must be at least 1")
            result = bench_tts(settings, args.runs, args.tokens)
        else:
            result = bench_streams(settings, _levels(args), args.tokens, args.probes)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _levels(args: argparse.Namespace) -> list[int] | None:
    try:
        levels = [int(n) for n in args.levels.split(",")] if args.levels else None
    except ValueError:
        raise InputError(f"--levels must be numbers separated by commas, got {args.levels!r}") from None
    if levels is not None and not all(1 <= n <= 1024 for n in levels):
        raise InputError(f"--levels must be between 1 and 1024, got {args.levels!r}")
    return levels


def cmd_bench_webrtc(args: argparse.Namespace, settings: Settings) -> int:
    from signaling.bench import bench_webrtc
    from signaling.webrtc.loopback import CALLER_RATE

    if args.turns < 1 or args.max_calls < 1:
        raise InputError("--turns and --max-calls must be at least 1")
    return _bench_call(args, settings, CALLER_RATE, lambda sessions, speech: bench_webrtc(
        sessions, settings, speech, args.turns, max_level=args.max_calls))


def cmd_bench_sip(args: argparse.Namespace, settings: Settings) -> int:
    from signaling.bench import bench_sip
    from signaling.sip.rtp import RATE as G711_RATE

    if args.turns < 1:
        raise InputError("--turns must be at least 1")
    return _bench_call(args, settings, G711_RATE, lambda sessions, speech: bench_sip(sessions, settings, speech, args.turns))


def cmd_bench_soak(args: argparse.Namespace, settings: Settings) -> int:
    from agent.audio import read_audio
    from agent.bench import FIXTURES
    from signaling.sip.rtp import RATE as G711_RATE
    from signaling.soak import bench_soak
    from signaling.webrtc.loopback import CALLER_RATE

    warmup = args.warmup if args.warmup is not None else max(5, args.calls // 5)
    if args.calls < 2 or not 0 <= warmup <= args.calls - 2:
        raise InputError("--calls must be at least 2, and --warmup leave at least 2 calls measured")
    server_args = [a for flag, value in (("--profile", args.profile), ("--config", args.config)) if value
                   for a in (flag, value)]
    question = FIXTURES / "question1.wav"

    def progress(sample: dict) -> None:
        print(f"call {sample['call']}/{args.calls}: {sample['rss_mib']:.1f} MiB, {sample['threads']} threads, "
              f"{sample['fds']} fds", file=sys.stderr, flush=True)

    result = asyncio.run(bench_soak(server_args, args.transport, args.calls, warmup, read_audio(question, CALLER_RATE),
                                    read_audio(question, G711_RATE), progress))
    result.update(profile=settings.profile)
    print(json.dumps(result) if args.json else {k: v for k, v in result.items() if k != "samples"})
    return 0


def _bench_call(args: argparse.Namespace, settings: Settings, rate: int, bench) -> int:
    """Load the models, run `bench(sessions, speech)` (a coroutine) with the two fixture
    questions at `rate` Hz as the caller's speech, and print its result."""
    from agent.audio import read_audio
    from agent.bench import FIXTURES

    speech = [read_audio(FIXTURES / name, rate) for name in ("question1.wav", "question2.wav")]
    with loaded_sessions(settings) as sessions:
        result = asyncio.run(bench(sessions, speech))
    result.update(profile=settings.profile, device=sessions.device)
    print(json.dumps(result) if args.json else result)
    return 0


def cmd_bench_snac(args: argparse.Namespace, settings: Settings) -> int:
    from agent.bench import bench_snac
    from agent.models.memory import resolve_device
    from agent.models.snac import load_snac
    from agent.models.tiny import resolve_source

    if args.seconds <= 0 or args.token_rate <= 0:
        raise InputError("--seconds and --token-rate must be positive")
    device = resolve_device(settings.device.device)
    snac = load_snac(resolve_source(settings.snac.model, "snac"), device, noise=False)
    result = bench_snac(snac, args.seconds, args.token_rate, settings.snac.max_frames_per_window)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
