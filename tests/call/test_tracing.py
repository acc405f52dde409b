"""OpenTelemetry traces of calls (agent/call/tracing.py): the spans of a real headless call
on the tiny profile, caught by the SDK's in-memory exporter; and how tracing is turned on."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent.audio import Resampler
from agent.call.factory import SessionFactory
from agent.call.records import CallRecords
from agent.call.tracing import configure_tracing
from agent.errors import ConfigError
from signaling.headless import run_call

session_loop = pytest.mark.asyncio(loop_scope="session")  # the models fixture's loop


@session_loop
async def test_a_call_traces_one_span_a_call_a_turn_and_a_stage(models, tiny_settings, speech):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sessions = SessionFactory(models, CallRecords(tiny_settings.records), tracer=provider.get_tracer("test"))
    audio = np.concatenate([speech[0], np.zeros(32000, np.int16), speech[1], np.zeros(32000, np.int16)])
    result = await run_call(sessions, audio, Resampler(24000).push(audio, 16000), tiny_settings, seed=3)
    spans = exporter.get_finished_spans()
    (call,) = [s for s in spans if s.name == "call"]
    assert call.parent is None and call.attributes["call.id"] == result.record.id
    assert call.attributes["call.transport"] == "headless" and call.attributes["call.turns"] == 2
    turns = sorted((s for s in spans if s.name == "turn"), key=lambda s: s.attributes["turn.index"])
    assert [t.attributes["turn.index"] for t in turns] == [1, 2]
    for span, record in zip(turns, result.turns, strict=True):
        assert span.parent.span_id == call.context.span_id and span.context.trace_id == call.context.trace_id
        assert call.start_time <= span.start_time <= span.end_time <= call.end_time
        # The same figures as the Prometheus histograms.
        for stage, ms in record.latency_ms().items():
            if ms is not None:
                assert span.attributes[f"latency_ms.{stage}"] == ms
        children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id}
        assert set(children) == {"vad", "reply", "speech", "playback"}
        for child in children.values():
            assert span.start_time <= child.start_time <= child.end_time <= span.end_time
        vad_ms = (children["vad"].end_time - children["vad"].start_time) / 1e6
        assert vad_ms == pytest.approx(record.latency_ms()["vad"], abs=1.0)
        assert children["playback"].start_time >= children["speech"].end_time


def test_tracing_is_off_unless_asked(tiny_settings):
    off = tiny_settings.tracing
    assert configure_tracing(off, env={}) is None
    assert configure_tracing(off, env={"OTEL_TRACES_EXPORTER": "none"}) is None
    on = tiny_settings.replace("tracing", enabled=True).tracing
    assert configure_tracing(on, env={"OTEL_SDK_DISABLED": "true"}) is None


def test_an_exporter_that_cannot_be_had_is_one_line(tiny_settings):
    on = tiny_settings.replace("tracing", enabled=True).tracing
    with pytest.raises(ConfigError, match="exporter 'zipkin' is not supported"):
        configure_tracing(on, env={"OTEL_TRACES_EXPORTER": "zipkin"})
    try:
        import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError:  # the OTLP exporter is not installed here: say how to get it
        with pytest.raises(ConfigError, match="needs the package opentelemetry-exporter-otlp-proto-http"):
            configure_tracing(on, env={})


def test_run_with_console_traces_keeps_stdout_json(tmp_path):
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console"}
    env.pop("VOICE_AGENT_PROFILE", None)
    p = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--profile", "tiny", "--input",
                        "tests/fixtures/question1.wav", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout)
    assert '"name": "call"' in p.stderr and '"name": "turn"' in p.stderr and '"name": "playback"' in p.stderr
    assert report["call_id"] in p.stderr
