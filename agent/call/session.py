"""One call: the caller's audio in, the agent's audio out, whatever the transport.

    push_audio() ─► Resampler (16 kHz mono) ─► VADSegmenter ─► Utterance
        (at each pause, Smart Turn decides whether the turn is over: end it early or wait)
        ─► Voxtral reply, streamed token by token ─► TextSegmenter (first clause, then sentences)
        ─► TTSServiceDirect ─► OutboundAudio (fixed-size frames) ─► the transport's player

A transport only calls push_audio() with what it receives, takes frames from
`outbound` at its own pace (20 ms by default), calls greet() when the call is answered
and hangs up when `ended` is set (an idle caller); `events` tells what happened. When
the caller starts speaking while the agent talks, its audio is held; a short sound lets
it play on, and session.barge_in_ms of speech is a barge-in: the turn is cancelled,
which stops generation, and the queued audio is dropped at once; the conversation keeps
only the part of the reply that was played. On phone lines the
agent's own voice comes back as echo: an EchoGuard (agent/call/echo.py) in front of the VAD,
fed every frame played, keeps it from counting as the caller barging in.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from agent.audio import Resampler
from agent.call.echo import EchoGuard
from agent.call.events import (
    AgentHungUp,
    AgentInterrupted,
    AgentPaused,
    AgentReplyText,
    AgentResumed,
    CallerSpeechStarted,
    CallerSpeechStopped,
    CallerTranscript,
    CallTransferred,
    DtmfReceived,
    Segment,
    SessionEvent,
    TurnFailed,
    TurnFinished,
    TurnRecord,
)
from agent.call.outbound import OutboundAudio, OutFrame
from agent.call.recording import CallRecording
from agent.call.tracing import CallTrace
from agent.call.vad import (
    SileroDetector,
    SpeechDetector,
    SpeechDiscarded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    Utterance,
    VADEvent,
    VADSegmenter,
    WebRtcDetector,
)
from agent.config import Settings
from agent.models.manager import UnifiedModelManager
from agent.models.voxtral import ChatTurn, ReplyParams, TurnAudio
from agent.rates import IN_RATE, OUT_RATE
from agent.text import TextSegmenter

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

TRANSCRIPT_WAIT_S = 3.0  # at hang-up, how long the transcripts still being written may take


# -- the session -------------------------------------------------------------------

class _ReplyFailed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


@dataclass
class _Reply:
    """A reply being written: the caller's audio it answers and Voxtral's text so far
    (a queue of speakable pieces, ended by None). Started at a pause (preemptive), it
    becomes the turn's reply if the turn ends in that pause, and is dropped otherwise."""
    record: TurnRecord
    audio: np.ndarray | None  # None: the agent speaks first (the greeting)
    heard: TurnAudio | None
    texts: asyncio.Queue
    producer: asyncio.Future  # what writes `texts` (a finished future when the text is known)
    pause: int | None = None


class CallSession:
    """One call. Create it inside a running event loop; close() when the call ends."""

    def __init__(self, models: UnifiedModelManager, settings: Settings | None = None,
                 clock: Callable[[], float] = time.monotonic, voice: str | None = None,
                 seed: int | None = None, echo_guard: bool = False, call_id: str | None = None,
                 recording: CallRecording | None = None, tracer: Tracer | None = None) -> None:
        """`echo_guard`: the transport brings the agent's own voice back (a phone line);
        echo.guard = "auto" follows it, "on" / "off" override it. `recording`: where the
        call's stereo recording goes (records.audio), closed with the session. `tracer`:
        OpenTelemetry's (the process's by default; agent/call/tracing.py)."""
        self.models = models
        self.call_id = call_id or uuid.uuid4().hex[:12]
        self.started_at = time.time()  # wall clock, for the call's record
        self.trace = CallTrace(self.call_id, self.started_at, tracer)
        self.settings = settings or models.settings
        s = self.settings
        self.clock = clock
        self._t0 = clock()
        self.voice = models.validate_voice(voice or s.session.voice or None)
        self.seed = seed if seed is not None else (s.tts.seed if s.tts.seed >= 0 else random.randrange(2**31))
        guard = s.echo.guard == "on" or (s.echo.guard == "auto" and echo_guard)
        self.echo = EchoGuard(s.echo, IN_RATE * s.vad.frame_ms // 1000) if guard else None
        detector: SpeechDetector = (SileroDetector(models.silero_vad().stream(), s.vad.threshold)
                                    if s.vad.engine == "silero" else WebRtcDetector(s.vad))
        # With the end-of-turn model, a short silence asks it, and the long one is the limit.
        self.end_of_turn = models.smart_turn(s.turn.model) if s.turn.engine == "smart_turn" else None
        model = self.end_of_turn is not None
        self.vad = VADSegmenter(s.vad, detector, frame_filter=self.echo.process if self.echo is not None else None,
                                end_ms=s.turn.max_silence_ms if model else None,
                                pause_ms=s.turn.min_silence_ms if model else None)
        self._decision: asyncio.Task | None = None  # the end-of-turn model hearing the latest pause
        self._preemptive = model and s.turn.preemptive
        self._early: _Reply | None = None  # a reply started at the latest pause (turn.preemptive)
        # An idle caller (session.idle_prompt_s, idle_hangup_s): since when the agent has
        # finished its turn and the caller has said nothing, and whether they were asked.
        self._idle_armed = False
        self._quiet_since: float | None = None
        self._prompted = False
        self.ended = asyncio.Event()  # the session ended the call itself: the transport hangs up
        self.end_reason: str | None = None
        self._held_since: float | None = None  # the agent's audio is held for a sound of the caller's
        self.resampler = Resampler(IN_RATE)
        self.recording = recording
        self._recording_resampler = Resampler(OUT_RATE) if recording is not None else None
        self.dtmf: list[DtmfReceived] = []  # every key the caller pressed, for the call's record
        self._transcripts: dict[int, asyncio.Task] = {}  # turn index -> its caller transcript being written
        frame_samples = OUT_RATE * s.session.frame_ms // 1000
        max_frames = max(1, int(s.session.max_queued_s * 1000 / s.session.frame_ms))
        self.outbound = OutboundAudio(frame_samples, max_frames, on_played=self._on_played)
        self.events: asyncio.Queue[SessionEvent] = asyncio.Queue(maxsize=1000)
        self.turns: list[TurnRecord] = []
        # Remembered turns: the caller's audio (with its features or encoding, computed once)
        # and what became of the reply.
        self._context: deque[tuple[TurnAudio | None, TurnRecord]] = deque(maxlen=s.session.max_history_turns)
        self._unanswered = np.zeros(0, dtype=np.int16)  # caller audio of a turn cut before any reply was heard
        self._turn_task: asyncio.Task | None = None
        self._current: TurnRecord | None = None
        self.closed = False

    def now(self) -> float:
        """Session time in seconds since the call started."""
        return self.clock() - self._t0

    @property
    def agent_busy(self) -> bool:
        """The agent is thinking or has audio still to play."""
        return (self._turn_task is not None and not self._turn_task.done()) or len(self.outbound) > 0

    @property
    def deciding(self) -> bool:
        """The end-of-turn model is hearing a pause of the caller's, or a reply started
        at the pause (turn.preemptive) is being written."""
        return ((self._decision is not None and not self._decision.done())
                or (self._early is not None and not self._early.producer.done()))

    @property
    def history(self) -> list[ChatTurn]:
        """The conversation context given to Voxtral (bounded by session.max_history_turns)."""
        turns: list[ChatTurn] = []
        for audio, record in self._context:
            if not record.played_text:
                continue  # cut before a word was heard after the turn ended
            if audio is not None:  # None: the greeting, which no caller audio came before
                turns.append(ChatTurn("user", audio=audio))
            turns.append(ChatTurn("assistant", text=record.played_text or ""))
        return turns

    # -- input ---------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray, rate: int, channels: int = 1) -> None:
        """Caller audio as received (int16, any rate, interleaved channels). Never blocks."""
        if self.closed:
            return
        pcm = self.resampler.push(samples, rate, channels)
        if self.recording is not None and self._recording_resampler is not None:
            self.recording.caller(self._recording_resampler.push(samples, rate, channels))
        if self.echo is not None:
            self.echo.received(len(pcm))
        for event in self.vad.push(pcm):
            self._on_vad(event)
        self._check_hold()
        self._check_idle()

    def _on_vad(self, event: VADEvent | None) -> None:
        if isinstance(event, SpeechStarted):
            self._idle_armed, self._quiet_since, self._prompted = False, None, False
            self._emit(CallerSpeechStarted(event.start))
            if self.agent_busy:
                self._hold() if self._may_hold() else self.barge_in()
        elif self._held_since is not None and isinstance(event, (SpeechPaused, Utterance, SpeechDiscarded)):
            if not isinstance(event, SpeechPaused):  # over before it was a barge-in: a backchannel
                self._resume()
        elif isinstance(event, SpeechPaused):
            self._stop_deciding()
            self._decision = asyncio.get_running_loop().create_task(self._decide(event))
            if self._preemptive:
                self._start_early(event)
        elif isinstance(event, SpeechResumed):
            self._stop_deciding()
            self._drop_early()
        elif isinstance(event, Utterance):
            self._stop_deciding()
            self._emit(CallerSpeechStopped(event.end, event.end - event.start))
            self._start_turn(event)
        elif isinstance(event, SpeechDiscarded):
            self._stop_deciding()
            self._drop_early()
            log.debug("ignored a short sound at %.2f s", event.start)

    async def _decide(self, pause: SpeechPaused) -> None:
        """Ask the end-of-turn model about a pause; a finished turn ends now, an
        unfinished one waits for more speech (or for turn.max_silence_ms)."""
        assert self.end_of_turn is not None
        try:
            complete = await self.end_of_turn.predict(pause.audio)
        except Exception as e:  # the silence limit still ends the turn
            log.warning("the end-of-turn model failed (%s: %s); waiting for the silence limit", type(e).__name__, e)
            return
        if self.closed or self.vad.pause != pause.pause:
            return  # the caller went on, or the turn ended meanwhile
        log.debug("pause %d at %.2f s: turn complete with p=%.2f", pause.pause, pause.end, complete)
        if complete >= self.settings.turn.threshold:
            self._on_vad(self.vad.end_utterance())

    def _start_early(self, pause: SpeechPaused) -> None:
        """Start the reply to the turn so far before the decision (turn.preemptive): if
        the turn ends in this pause, its first words are already written. Nothing of it is
        spoken before then."""
        self._drop_early()
        start, end, decided_at = self._session_times(pause.start, pause.end, pause.decided_at)
        record = TurnRecord(index=len(self.turns) + 1, start=start, end=end, decided_at=decided_at, preemptive=True)
        self._early = self._reply(record, self._with_unanswered(pause.audio), pause.pause)

    def _drop_early(self) -> None:
        if self._early is not None:
            self._early.producer.cancel()
            log.debug("dropped the reply started at pause %s: the caller went on", self._early.pause)
            self._early = None

    def _stop_deciding(self) -> None:
        if self._decision is not None and not self._decision.done() and self._decision is not asyncio.current_task():
            self._decision.cancel()
        self._decision = None

    def push_dtmf(self, digit: str) -> str | None:
        """A key the caller pressed (RFC 4733 on phone lines), emitted as DtmfReceived.
        Returns what the transport is to do: "hangup" (session.hangup_digit), "transfer"
        (session.transfer_digit, to session.transfer_to), or None."""
        if self.closed:
            return None
        event = DtmfReceived(digit, self.now())
        self.dtmf.append(event)
        self._emit(event)
        s = self.settings.session
        if digit == s.hangup_digit:
            return "hangup"
        if digit == s.transfer_digit:
            return "transfer"
        return None

    def transferred(self, to: str, ok: bool, status: str) -> None:
        """The transport's transfer of the call ended: emitted as CallTransferred; a failed
        one is said to the caller (session.transfer_failed) and the call goes on."""
        self._emit(CallTransferred(to, ok, status, self.now()))
        if not ok:
            self.barge_in()  # whatever the agent was saying is moot now
            self._say(self.settings.session.transfer_failed, "transfer_failed")

    def _may_hold(self) -> bool:
        """A sound of the caller's pauses the agent (rather than cutting it) while the
        agent's reply is being heard, when session.barge_in_ms asks for more speech than
        the VAD needed to start."""
        record = self._current
        return (self.settings.session.barge_in_ms > self.settings.vad.start_ms and record is not None
                and record.agent_start is not None and not record.interrupted)

    def _hold(self) -> None:
        self.outbound.hold()
        self._held_since = self.now()
        assert self._current is not None  # _may_hold() checked it
        self._emit(AgentPaused(self._current.index, self._held_since))

    def _check_hold(self) -> None:
        """While the agent is held: enough speech is a barge-in; a pause lets it play on."""
        if self._held_since is None:
            return
        s = self.settings.session
        if self.vad.in_speech and self.vad.voiced_ms >= s.barge_in_ms:
            self.barge_in()
        elif not self.vad.in_speech or self.vad.silent_ms >= s.resume_after_ms:
            self._resume()

    def _resume(self) -> None:
        """The caller's sound is over and was short: forget it and play on."""
        if self._held_since is None:
            return
        if self.vad.in_speech:
            self.vad.drop_utterance()
        self._stop_deciding()
        self._drop_early()
        now, since = self.now(), self._held_since
        self._held_since = None
        self.outbound.release()
        record = self._current
        log.info("a short sound while the agent spoke (%.2f s held): playing on", now - since)
        self._emit(AgentResumed(record.index if record is not None else 0, now, now - since))

    def barge_in(self) -> None:
        """The caller talks over the agent: stop the turn and drop its queued audio now.
        When none of the reply had been heard yet, the caller had not finished: the turn
        is taken back (removed from `turns`), and its words go with what they say next."""
        record = self._current
        self._held_since = None
        dropped = self.outbound.clear()
        if self._turn_task is not None and not self._turn_task.done():
            self._turn_task.cancel()
        if record is None or record.interrupted or record.withdrawn:
            return
        if record.agent_start is None:
            record.withdrawn = True
            self._current = None
            if self.turns and self.turns[-1] is record:
                self.turns.pop()
            self._drop_transcript(record)
            log.info("turn %d withdrawn: the caller went on before the reply was heard", record.index)
            return
        record.interrupted = True
        record.played_text = record.heard_text()
        self._emit(AgentInterrupted(record.index, record.played_text, dropped))
        log.info("turn %d interrupted after: %r", record.index, record.played_text)

    # -- a turn --------------------------------------------------------------------

    def greet(self) -> None:
        """The call was answered: speak session.greeting ("" says nothing) as the agent's
        first turn, which the caller can barge into like any reply. Once per call, and only
        before anything else was said."""
        if not self.turns and self._turn_task is None:
            self._say(self.settings.session.greeting, "greeting")

    def _check_idle(self) -> None:
        """After the agent's turn, a caller silent for session.idle_prompt_s is asked
        session.idle_prompt, and one silent for session.idle_hangup_s is hung up on."""
        s = self.settings.session
        if not self._idle_armed or self.ended.is_set() or not (s.idle_prompt_s or s.idle_hangup_s):
            return
        if self.agent_busy or self.vad.in_speech or self.deciding:
            return  # the silence counts on through the prompt itself
        now = self.now()
        if self._quiet_since is None:
            self._quiet_since = now
        quiet = now - self._quiet_since
        if s.idle_hangup_s and quiet >= s.idle_hangup_s:
            log.info("the caller said nothing for %.0f s: hanging up", quiet)
            self.end_reason = "idle caller"
            self._emit(AgentHungUp(self.end_reason, now))
            self.ended.set()
        elif s.idle_prompt_s and not self._prompted and quiet >= s.idle_prompt_s:
            self._prompted = True
            self._say(s.idle_prompt, "idle_prompt")

    def _say(self, text: str, kind: str) -> None:
        """Speak a known text as an agent turn of its own (no caller audio before it)."""
        text = text.strip()
        if not text or self.closed:
            return
        now = self.now()
        record = TurnRecord(index=len(self.turns) + 1, start=now, end=now, decided_at=now, t_decision=now,
                            busy_at_decision=self.models.busy_s, reply_text=text, kind=kind)
        texts: asyncio.Queue = asyncio.Queue()
        segmenter = TextSegmenter(self.settings.session.min_first_chunk_chars)
        for piece in [*segmenter.push(text), segmenter.flush()]:
            if piece:
                texts.put_nowait(piece)
        texts.put_nowait(None)
        written = asyncio.get_running_loop().create_future()
        written.set_result(None)  # nothing to write: the text is known
        self.turns.append(record)
        self._current = record
        reply = _Reply(record, None, None, texts, written)
        self._turn_task = asyncio.get_running_loop().create_task(self._run_turn(reply))

    def _session_times(self, start: float, end: float, decided_at: float) -> tuple[float, float, float]:
        """(start, end, decided_at), the VAD's stream times, on the session clock."""
        lag = self.vad.now - decided_at  # VAD stream time vs this moment (0 unless buffered)
        shift = self.now() - decided_at - lag  # session time = stream time + shift
        return start + shift, end + shift, decided_at + shift

    def _with_unanswered(self, audio: np.ndarray) -> np.ndarray:
        return np.concatenate([self._unanswered, audio]) if len(self._unanswered) else audio

    def _reply(self, record: TurnRecord, audio: np.ndarray, pause: int | None = None) -> _Reply:
        texts: asyncio.Queue = asyncio.Queue()
        heard = TurnAudio(_to_float(audio))
        producer = asyncio.get_running_loop().create_task(self._reply_text(record, heard, texts))
        return _Reply(record, audio, heard, texts, producer, pause)

    def _start_turn(self, utt: Utterance) -> None:
        early, self._early = self._early, None
        if early is not None and (utt.pause is None or early.pause != utt.pause):
            early.producer.cancel()
            early = None
        start, end, decided_at = self._session_times(utt.start, utt.end, utt.decided_at)
        if early is not None:  # the turn ended in the pause its reply was started at
            reply = early
            reply.record.decided_at = decided_at
        else:
            record = TurnRecord(index=len(self.turns) + 1, start=start, end=end, decided_at=decided_at)
            reply = self._reply(record, self._with_unanswered(utt.audio))
        reply.record.t_decision = self.now()
        reply.record.busy_at_decision = self.models.busy_s
        self._unanswered = np.zeros(0, dtype=np.int16)
        self.turns.append(reply.record)
        self._current = reply.record
        self._turn_task = asyncio.get_running_loop().create_task(self._run_turn(reply))

    async def _run_turn(self, reply: _Reply) -> None:
        record, audio, heard, texts, producer = reply.record, reply.audio, reply.heard, reply.texts, reply.producer
        try:
            await self._speak(record, texts, heard)
            if record.played_text is None:
                record.played_text = " ".join(seg.text for seg in record.segments)
            self._emit(TurnFinished(record))
            if record.kind != "idle_prompt":  # the silence after the prompt still counts from before it
                self._quiet_since, self._prompted = None, False
            self._idle_armed = True
        except asyncio.CancelledError:
            pass  # barge-in or hang-up; barge_in() recorded what was heard
        except Exception as e:  # a model failure ends this turn only
            record.error = f"{type(e).__name__}: {e}"
            log.warning("turn %d failed: %s", record.index, record.error)
            self._emit(TurnFailed(record.index, record.error))
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            self._remember(record, audio, heard)
            if not record.withdrawn:
                self._transcribe(record, heard)  # a reply that made no audio (or was cut at hang-up)
                self.trace.turn(record)

    def _remember(self, record: TurnRecord, audio: np.ndarray | None, heard: TurnAudio | None) -> None:
        if record.error is not None:
            return
        if record.withdrawn or (record.interrupted and not record.played_text):
            # Nothing was heard: the caller's words belong with what they say next.
            if audio is not None:
                self._unanswered = audio
            return
        if self._context.maxlen:
            self._context.append((heard, record))

    async def _reply_text(self, record: TurnRecord, audio: TurnAudio, texts: asyncio.Queue) -> None:
        v, session = self.settings.voxtral, self.settings.session
        params = ReplyParams(v.temperature, v.top_p, v.max_new_tokens)
        segmenter = TextSegmenter(session.min_first_chunk_chars)
        try:
            reply = self.models.reply(audio, self.history, session.instructions, session.instructions_first,
                                      params, self.seed + record.index)
            async with aclosing(reply) as pieces:
                async for piece in pieces:
                    if record.t_first_token is None:
                        record.t_first_token = self.now()
                    record.reply_text += piece
                    for text in segmenter.push(piece):
                        texts.put_nowait(text)
            rest = segmenter.flush()
            if rest:
                texts.put_nowait(rest)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            texts.put_nowait(_ReplyFailed(e))
        finally:
            texts.put_nowait(None)

    def _transcribe(self, record: TurnRecord, heard: TurnAudio | None) -> None:
        """Write the caller's words of this turn (records.transcribe), once the reply's first
        audio is queued: the reply never waits for it."""
        r = self.settings.records
        if not r.transcribe or heard is None or record.index in self._transcripts:
            return
        self._transcripts[record.index] = asyncio.get_running_loop().create_task(self._write_transcript(record, heard))

    async def _write_transcript(self, record: TurnRecord, heard: TurnAudio) -> None:
        r = self.settings.records
        params = ReplyParams(temperature=0.0, top_p=1.0, max_new_tokens=r.transcribe_tokens)
        try:
            record.transcript = await self.models.transcribe(heard, r.language or None, params,
                                                             self.seed + 500_000 + record.index)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the call goes on without this transcript
            log.warning("turn %d: the caller transcript failed: %s: %s", record.index, type(e).__name__, e)
            return
        if not record.withdrawn:
            self._emit(CallerTranscript(record.index, record.transcript))

    def _drop_transcript(self, record: TurnRecord) -> None:
        task = self._transcripts.pop(record.index, None)
        if task is not None:
            task.cancel()

    async def _speak(self, record: TurnRecord, texts: asyncio.Queue, heard: TurnAudio | None = None) -> None:
        while (item := await texts.get()) is not None:
            if isinstance(item, _ReplyFailed):
                raise item.error
            segment = Segment(item)
            record.segments.append(segment)
            index = len(record.segments) - 1
            self._emit(AgentReplyText(record.index, item))
            async with aclosing(self.models.speak(item, self.voice, self.seed + 1000 * record.index + index)) as audio:
                async for chunk in audio:
                    if record.t_first_tts_audio is None:
                        record.t_first_tts_audio = self.now()
                    segment.produced += len(chunk)
                    made = await self.outbound.put(chunk, record.index, index)
                    if made and record.t_first_frame is None:
                        record.t_first_frame = self.now()
                        record.busy_at_first_frame = self.models.busy_s
                        self._transcribe(record, heard)
        self.outbound.finish()

    def _on_played(self, frame: OutFrame) -> None:
        if self.recording is not None:
            self.recording.agent(frame.samples)
        if self.echo is not None:
            self.echo.play(frame.samples, OUT_RATE, self.now())  # what may come back as echo
        record = self.turns[frame.turn - 1] if 0 < frame.turn <= len(self.turns) else None
        if record is None:
            return
        now = self.now()
        record.agent_start = record.agent_start if record.agent_start is not None else now
        record.agent_end = now + self.settings.session.frame_ms / 1000
        if frame.segment < len(record.segments):
            record.segments[frame.segment].played += len(frame.samples)

    def _emit(self, event: SessionEvent) -> None:
        if self.events.full():
            self.events.get_nowait()  # nobody is reading: keep the newest
        self.events.put_nowait(event)

    async def close(self) -> None:
        """Hang up: stop generation, drop queued audio, end the turn task; the caller
        transcripts being written get TRANSCRIPT_WAIT_S to finish; close the recording."""
        if self.closed:
            return
        self.closed = True
        self._stop_deciding()
        self._drop_early()
        self.outbound.clear()
        task = self._turn_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        pending = [t for t in self._transcripts.values() if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=TRANSCRIPT_WAIT_S)
            for t in late:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._context.clear()  # the remembered turns' encodings (device memory)
        if self.recording is not None:
            self.recording.close()


def _to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0
