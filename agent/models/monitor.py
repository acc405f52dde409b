"""Per-request speech metrics, checked against targets, with a JSON report."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from agent.config import MonitorSettings
from agent.rates import OUT_RATE

log = logging.getLogger(__name__)
_ids = itertools.count(1)


@dataclass
class RequestMetrics:
    """The timings of one speech request."""
    voice: str
    text_chars: int
    request_id: int = field(default_factory=lambda: next(_ids))
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    first_audio: float | None = None
    end: float | None = None
    tokens: int = 0
    audio_samples: int = 0
    snac_s: float = 0.0
    invalid_tokens: int = 0
    retries: int = 0
    error: str | None = None

    def _ms_since_start(self, t: float | None) -> float | None:
        return None if t is None else (t - self.start) * 1000.0

    @property
    def ttft_ms(self) -> float | None:
        return self._ms_since_start(self.first_token)

    @property
    def ttfa_ms(self) -> float | None:
        return self._ms_since_start(self.first_audio)

    @property
    def elapsed_s(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    @property
    def audio_s(self) -> float:
        return self.audio_samples / OUT_RATE

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def rtf(self) -> float | None:
        """Processing time / audio duration: below 1 is faster than real time."""
        return self.elapsed_s / self.audio_s if self.audio_s > 0 else None

    def to_dict(self) -> dict:
        r = lambda x: None if x is None else round(x, 3)  # noqa: E731
        return {
            "request_id": self.request_id, "voice": self.voice, "text_chars": self.text_chars,
            "ttft_ms": r(self.ttft_ms), "ttfa_ms": r(self.ttfa_ms), "tokens": self.tokens,
            "tokens_per_s": r(self.tokens_per_s), "audio_s": r(self.audio_s),
            "snac_ms": r(self.snac_s * 1000.0), "rtf": r(self.rtf), "elapsed_s": r(self.elapsed_s),
            "invalid_tokens": self.invalid_tokens, "retries": self.retries, "error": self.error,
        }


class PerformanceMonitor:
    """Collects RequestMetrics, warns when a target is missed, and summarises them."""

    def __init__(self, targets: MonitorSettings, keep: int = 1000) -> None:
        self.targets = targets
        self.requests: deque[RequestMetrics] = deque(maxlen=keep)
        self.missed: dict[str, int] = {"ttft_ms": 0, "ttfa_ms": 0, "rtf": 0}

    def start(self, voice: str, text: str) -> RequestMetrics:
        return RequestMetrics(voice=voice, text_chars=len(text))

    def finish(self, m: RequestMetrics) -> None:
        m.end = m.end or time.perf_counter()
        self.requests.append(m)
        for name, value, target in (
            ("ttft_ms", m.ttft_ms, self.targets.ttft_ms_target),
            ("ttfa_ms", m.ttfa_ms, self.targets.ttfa_ms_target),
            ("rtf", m.rtf, self.targets.rtf_target),
        ):
            if value is not None and value > target:
                self.missed[name] += 1
                log.warning("request %d missed its %s target: %.1f > %.1f", m.request_id, name, value, target)

    def report(self) -> dict:
        """Counts, p50/p95 of each latency, and how often each target was missed."""
        done = list(self.requests)

        def pct(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"p50": None, "p95": None}
            return {"p50": round(float(np.percentile(values, 50)), 3),
                    "p95": round(float(np.percentile(values, 95)), 3)}

        pick = lambda attr: [getattr(m, attr) for m in done if getattr(m, attr) is not None]  # noqa: E731
        return {
            "requests": len(done),
            "errors": sum(1 for m in done if m.error),
            "ttft_ms": pct(pick("ttft_ms")),
            "ttfa_ms": pct(pick("ttfa_ms")),
            "rtf": pct(pick("rtf")),
            "tokens_per_s": pct(pick("tokens_per_s")),
            "targets": {"ttft_ms": self.targets.ttft_ms_target, "ttfa_ms": self.targets.ttfa_ms_target,
                        "rtf": self.targets.rtf_target},
            "missed": dict(self.missed),
        }

    def report_json(self) -> str:
        return json.dumps(self.report())
