"""Traces of calls (OpenTelemetry): one span a call, one a turn, and a child span for each
stage of a turn, timed like the Prometheus latency histograms.

    call ─┬─ turn 1 ─┬─ vad       end of the caller's speech -> the end of turn decided
          │          ├─ reply     the reply started -> its first token
          │          ├─ speech    the first token -> the first audio from TTS
          │          └─ playback  the first frame heard -> the last
          └─ turn 2 ...

A turn's spans are made when the turn is over, from the times its TurnRecord kept (an
exporter sees each turn as it ends, not only at hang-up); the call's span ends with the
call. Sessions always make their spans through OpenTelemetry's API, which does nothing
until configure_tracing() installs a provider: tracing is off unless [tracing] or
OpenTelemetry's own OTEL_* variables turn it on.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from agent.call.events import TurnRecord
from agent.config import TracingSettings
from agent.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

TRACER_NAME = "voice_agent"


def configure_tracing(settings: TracingSettings, env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Install this process's tracer provider when tracing is on (None when it is off).
    OpenTelemetry's variables win over the settings: OTEL_TRACES_EXPORTER (otlp, console,
    none), OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, OTEL_SERVICE_NAME, OTEL_SDK_DISABLED.
    ConfigError (one line) for an exporter that cannot be had."""
    env = os.environ if env is None else env
    chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if chosen == "none" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not (settings.enabled or chosen or endpoint):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = chosen or ("otlp" if endpoint else settings.exporter)
    provider = TracerProvider(resource=Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME") or settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s exporter", name)
    return provider


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)  # stdout is for `run --json`
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("tracing: the otlp exporter needs the package opentelemetry-exporter-otlp-proto-http "
                              "(pip install it into the agent's environment), or set OTEL_TRACES_EXPORTER=console") from None
        return OTLPSpanExporter()
    raise ConfigError(f"tracing: exporter {name!r} is not supported (use otlp, console or none)")


class CallTrace:
    """The spans of one call. `started_at` is the call's Unix time; session times (seconds
    since the call started) are placed after it."""

    def __init__(self, call_id: str, started_at: float, tracer: trace.Tracer | None = None) -> None:
        self.tracer = tracer if tracer is not None else trace.get_tracer(TRACER_NAME)
        self._start_ns = int(started_at * 1e9)
        self.span = self.tracer.start_span("call", start_time=self._start_ns, attributes={"call.id": call_id})
        self._context = trace.set_span_in_context(self.span)
        self.ended = False

    def _ns(self, t: float) -> int:
        return self._start_ns + int(t * 1e9)

    def turn(self, record: TurnRecord) -> None:
        """The spans of a turn that is over (answered, interrupted or failed)."""
        times = [t for t in (record.end, record.t_decision, record.t_first_token, record.t_first_tts_audio,
                             record.t_first_frame, record.agent_end) if t is not None]
        latency = {f"latency_ms.{k}": v for k, v in record.latency_ms().items() if v is not None}
        span = self.tracer.start_span("turn", context=self._context, start_time=self._ns(record.start), attributes={
            "turn.index": record.index, "turn.kind": record.kind, "turn.interrupted": record.interrupted,
            "turn.preemptive": record.preemptive, **latency})
        inside = trace.set_span_in_context(span)
        # A preemptive reply was started at the pause, before the decision.
        reply_start = record.end if record.preemptive else record.t_decision
        for name, start, end in (("vad", record.end, record.t_decision),
                                 ("reply", reply_start, record.t_first_token),
                                 ("speech", record.t_first_token, record.t_first_tts_audio),
                                 ("playback", record.agent_start, record.agent_end)):
            if start is None or end is None or end < start:
                continue  # a stage the turn never reached
            self.tracer.start_span(name, context=inside, start_time=self._ns(start)).end(end_time=self._ns(end))
        if record.error is not None:
            span.set_status(Status(StatusCode.ERROR, record.error))
        span.end(end_time=self._ns(max(times, default=record.start)))

    def end(self, ended_at: float, transport: str, ended_by: str, end_reason: str, turns: int) -> None:
        """The call is over (at Unix time `ended_at`): its span ends, with what its record says."""
        if self.ended:
            return
        self.ended = True
        self.span.set_attributes({"call.transport": transport, "call.ended_by": ended_by,
                                  "call.end_reason": end_reason, "call.turns": turns})
        if ended_by == "error":
            self.span.set_status(Status(StatusCode.ERROR, end_reason))
        self.span.end(end_time=int(ended_at * 1e9))
