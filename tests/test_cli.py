"""`voice-agent` end to end, as a user runs it, on the tiny profile."""

import json
import os
import subprocess
import sys
import wave

import pytest

from agent.models.snac import FRAME_SAMPLES


def run(*args, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("VOICE_AGENT_PROFILE", None)
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, timeout=timeout,
                          env=full_env)


def test_say_writes_a_wav_and_reports_json(tmp_path):
    out = tmp_path / "hello.wav"
    p = run("say", "Hello there. Nice to meet you!", "--profile", "tiny", "--seed", "3", "-o", str(out), "--json",
            "--voice", "mia")
    assert p.returncode == 0, p.stderr.decode()
    report = json.loads(p.stdout)
    for key in ("audio_s", "ttfa_ms", "tokens", "tokens_per_s", "rtf", "voice"):
        assert key in report, key
    assert report["voice"] == "mia" and report["tokens"] > 0
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() == report["tokens"] // 7 * FRAME_SAMPLES
        assert abs(w.getnframes() / 24000 - report["audio_s"]) < 1e-3


def test_say_streams_raw_pcm_to_stdout():
    p = run("say", "Streaming to a pipe.", "--profile", "tiny", "--seed", "1", "-o", "-")
    assert p.returncode == 0, p.stderr.decode()
    assert len(p.stdout) > 0 and len(p.stdout) % (2 * FRAME_SAMPLES) == 0
    assert not p.stdout.startswith(b"RIFF")


def test_bench_replies_json():
    """Voxtral replies at once, single path vs reply engine, on the tiny profile."""
    p = run("bench", "replies", "--profile", "tiny", "--levels", "1,2", "--tokens", "6", "--json")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    result = json.loads(p.stdout.decode().strip().splitlines()[-1])
    for variant in ("single", "engine"):
        assert [lv["replies"] for lv in result[variant]] == [1, 2]
        assert all(lv["all_tokens_per_s"] > 0 and lv["first_token_ms_p50"] > 0 for lv in result[variant])
    assert len(result["engine_vs_single_all_tokens_per_s"]) == 2


@pytest.mark.parametrize("args, message", [
    (["say", ""], "text is empty"),
    (["say", "   "], "text is empty"),
    (["say", "Hi", "--voice", "bob"], "unknown voice 'bob'"),
    (["say", "Hi", "--config", "/nonexistent/settings.toml"], "cannot read config file"),
    (["say", "Hi", "--profile", "huge"], "unknown profile 'huge'"),
    (["say", "Hi", "-o", "-", "--json"], "cannot be used with -o -"),
    (["say", "Hi", "-o", "/nonexistent/dir/out.wav"], "cannot write"),
    (["bench", "snac", "--seconds", "0"], "must be positive"),
    (["bench", "tts", "--tokens", "30"], "multiple of 7"),
    (["bench", "streams", "--levels", "1,x"], "numbers separated by commas"),
    (["bench", "streams", "--levels", "16,0"], "between 1 and 1024"),
    (["bench", "replies", "--tokens", "1"], "between 2 and 4096"),
    (["bench", "replies", "--levels", "2,a"], "numbers separated by commas"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    p = run(*args, "--profile", "tiny") if "--profile" not in args else run(*args)
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_config_value_exits_2(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[orpheus]\ntop_p = 2.0\n")
    p = run("say", "Hi", "--config", str(f))
    assert p.returncode == 2 and "orpheus.top_p" in p.stderr.decode()


def test_default_profile_without_weights_points_to_tiny(tmp_path):
    p = run("say", "Hi", "-o", str(tmp_path / "x.wav"), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    err = p.stderr.decode()
    assert p.returncode == 1
    last = err.strip().splitlines()[-1]
    assert "canopylabs/orpheus-3b-0.1-ft" in last and "--profile tiny" in last and "Traceback" not in err


def test_bench_snac_json():
    p = run("bench", "snac", "--profile", "tiny", "--seconds", "1.5", "--json")
    assert p.returncode == 0, p.stderr.decode()
    result = json.loads(p.stdout.decode().strip().splitlines()[-1])
    for mode in ("baseline", "default"):
        for key in ("ms_per_audio_s", "first_audio_after_tokens", "rel_l2_err"):
            assert key in result[mode]
    assert result["baseline"]["first_audio_after_tokens"] == 28
    assert result["default"]["first_audio_after_tokens"] <= 14
    assert result["default"]["rel_l2_err"] < 2e-2 < result["baseline"]["rel_l2_err"]
    assert result["default"]["lost_audio_ms"] == 0 and result["baseline"]["lost_audio_ms"] > 200


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_without_weights_stops_with_the_reason(tmp_path):
    p = run("serve", "--port", str(free_port()), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "mistralai/Voxtral-Mini-3B-2507" in last and "--profile tiny" in last and "Traceback" not in err


def test_serve_answers_sip_options_and_refuses_bad_ports():
    import socket
    import time

    p = run("serve", "--profile", "tiny", "--sip-port", "70000")
    assert p.returncode == 2 and "--sip-port" in p.stderr.decode()
    http_port, sip_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--profile", "tiny", "--port", str(http_port),
                             "--sip-port", str(sip_port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        options = (b"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKo1;rport\r\n"
                   b"From: <sip:probe@127.0.0.1>;tag=p\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: probe1\r\n"
                   b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        answers = []  # 503 while the models load (a dispatcher's probe skips the node), then 200
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            deadline = time.monotonic() + 240
            while not (answers and answers[-1].startswith(b"SIP/2.0 200")) and time.monotonic() < deadline:
                s.sendto(options, ("127.0.0.1", sip_port))
                try:
                    answers.append(s.recv(4096))
                except OSError:
                    pass
                time.sleep(0.2)
        assert answers and answers[-1].startswith(b"SIP/2.0 200"), answers[-1:]
        assert all(a.startswith((b"SIP/2.0 503", b"SIP/2.0 200")) for a in answers), answers
    finally:
        proc.terminate()
        proc.wait(30)


def test_bench_sip_json():
    p = run("bench", "sip", "--profile", "tiny", "--turns", "1", "--json")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    result = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert len(result["reply_latency_ms"]["turns"]) == 1 and result["reply_latency_ms"]["p50"] > 0
    assert result["rtp_pacing_interval_error_ms"]["packets"] > 50 and result["codec"] == "PCMU"


def test_bench_streams_json():
    """The engine bench on the tiny profile: both variants measured, the figures sane."""
    p = run("bench", "streams", "--profile", "tiny", "--levels", "1,2", "--tokens", "35", "--probes", "1", "--json")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    result = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert result["generate"][0]["streams"] == 1 and result["generate"][0]["tokens_per_s_per_stream"] > 0
    first = result["engine"][0]
    assert first["streams"] == 1 and first["min_tokens_per_s"] > 0 and first["probe_ttfa_ms_p50"] > 0
    assert first["loop_lag_ms_p99"] is not None and result["dtype"] == "float32"
    assert result["engine_real_time_streams"] in (0, 1, 2)


def test_bench_soak_sip_json():
    """Calls one after another to a served agent: the server's memory, threads and open
    descriptors are sampled after each call has ended."""
    p = run("bench", "soak", "--profile", "tiny", "--transport", "sip", "--calls", "3", "--warmup", "1", "--json")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    result = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert result["transport"] == "sip" and result["calls"] == 3 and len(result["samples"]) == 4
    assert all(s["rss_mib"] > 100 and s["threads"] > 1 and s["fds"] > 3 for s in result["samples"])
    # Each SIP call's sockets are closed when it ends.
    assert result["after_warmup"]["fds_growth"] == 0, result["samples"]
    assert "call 3/3" in p.stderr.decode()


def test_bench_soak_refuses_too_few_calls():
    p = run("bench", "soak", "--profile", "tiny", "--calls", "1")
    assert p.returncode == 2 and b"--calls must be at least 2" in p.stderr


def test_bench_pipeline_json():
    """A headless call of the two fixture questions: each turn's stages, and the time
    outside the models from the VAD decision to the first frame queued."""
    p = run("bench", "pipeline", "--profile", "tiny", "--json")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    result = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert result["turns"] == 2 and len(result["per_turn_ms"]) == 2
    for turn in result["per_turn_ms"]:
        # A preemptive reply (turn.preemptive) may have its first token before the decision;
        # nothing is queued to play before it.
        assert 0 < turn["vad"] <= turn["first_frame_queued"] and turn["first_token"] <= turn["first_frame_queued"]
        assert turn["pipeline_overhead"] is not None and turn["pipeline_overhead"] >= 0
