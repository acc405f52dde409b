"""TTSServiceDirect: text in, 24 kHz int16 audio chunks out, streamed as decoded.

The path of one sentence: prompt -> TokenStream (Orpheus, one token per step) ->
FrameAssembler (7 codes a frame) -> StreamingSNACDecoder -> int16 chunks.
All model work runs on one device thread, so the event loop never waits on a model.
With a `SpeechBatcher` (engine.mode = "batched", agent/engine.py) every sentence being
spoken joins one decode step shared by all calls; without one ("single") each stream
runs its own steps, pulled by its consumer. Either way a consumer that stops iterating
stops its stream, and its KV cache (or cache slot) is freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import AsyncIterator

import numpy as np

from .config import Settings
from .errors import AudioGenerationError, InputError
from .memory import GPUMemoryManager
from .engine import BatchedStream, DeviceThread, SpeechBatcher
from .monitor import PerformanceMonitor, RequestMetrics
from .orpheus import FRAME_TOKENS, FrameAssembler, OrpheusDirectModel, SamplingParams, TokenStream
from .snac_codec import StreamingSNACDecoder, to_int16

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:—])\s+")
_SPACE = re.compile(r"\s+")


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Split at sentence ends; split sentences longer than max_chars at clauses, then spaces."""
    out: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = " ".join(sentence.split())
        if sentence:
            out.extend(_pack(sentence, max_chars))
    return out


def _pack(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    for splitter in (_CLAUSE_END, _SPACE):
        pieces = splitter.split(sentence)
        if len(pieces) > 1:
            break
    else:
        return [sentence]  # one very long word stays whole rather than cut mid-word
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] += " " + piece
        else:
            chunks.append(piece)
    return [c for chunk in chunks for c in _pack(chunk, max_chars)]


def sentence_chars(settings: Settings) -> int:
    """The longest text spoken as one stream: tts.max_sentence_chars, and no more than
    orpheus.max_tokens can say at orpheus.tokens_per_char, so that a long sentence is split
    at a clause or a space rather than cut off mid-word at the token limit."""
    o = settings.orpheus
    return max(1, min(settings.tts.max_sentence_chars, int(o.max_tokens / o.tokens_per_char)))


class SpeechStream:
    """One sentence being spoken, advanced on the device thread. advance() runs decode
    steps (and a SNAC window when one is due) until new audio comes out, the stream
    ends, or one frame's worth of steps has run, so that other streams' steps can
    interleave and each hop to the device thread does a useful amount of work."""

    def __init__(self, tokens: TokenStream, decoder: StreamingSNACDecoder) -> None:
        self.tokens = tokens
        self.decoder = decoder
        self.assembler = FrameAssembler()
        self.done = False
        self.first_token_at: float | None = None  # perf_counter time of the first token

    @property
    def position(self) -> int:
        """Audio tokens generated so far."""
        return self.tokens.position

    def step(self) -> np.ndarray | None:
        """One decode step; returns new audio, if a SNAC window was decoded."""
        token = self.tokens.step()
        if token is None:
            self.done = True
            if self.tokens.truncated:
                self.decoder.fade_at_end()
            audio = self.decoder.flush()
        else:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            frame = self.assembler.push(token)
            audio = self.decoder.push(frame) if frame is not None else None
        return None if audio is None or len(audio) == 0 else audio

    def advance(self) -> np.ndarray | None:
        for _ in range(FRAME_TOKENS):
            audio = self.step()
            if audio is not None or self.done:
                return audio
        return None

    def close(self) -> None:
        self.done = True
        self.tokens.close()


class TTSServiceDirect:
    """Streaming speech from the in-process Orpheus and SNAC models."""

    def __init__(self, orpheus: OrpheusDirectModel, snac, settings: Settings,
                 monitor: PerformanceMonitor | None = None,
                 memory: GPUMemoryManager | None = None,
                 device_thread: "DeviceThread | None" = None,
                 batcher: SpeechBatcher | None = None) -> None:
        self.orpheus = orpheus
        self.snac = snac
        self.settings = settings
        self.monitor = monitor or PerformanceMonitor(settings.monitor)
        self.memory = memory
        self.batcher = batcher
        self.active: set[SpeechStream | BatchedStream] = set()
        # Every model call runs on the device thread (shared with Voxtral when given).
        self._owns_thread = device_thread is None
        self.device_thread = device_thread or DeviceThread()
        if sentence_chars(settings) < settings.tts.max_sentence_chars:
            log.info("sentences of over %d characters are split (orpheus.max_tokens %d at orpheus.tokens_per_char "
                     "%g), though tts.max_sentence_chars is %d", sentence_chars(settings),
                     settings.orpheus.max_tokens, settings.orpheus.tokens_per_char, settings.tts.max_sentence_chars)

    # -- validation -------------------------------------------------------------

    def validate_voice(self, voice: str | None) -> str:
        voice = voice or self.settings.tts.default_voice
        if voice not in self.settings.tts.voices:
            raise InputError(f"unknown voice {voice!r}; choose from: {', '.join(self.settings.tts.voices)}")
        return voice

    @staticmethod
    def validate_text(text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InputError("text is empty: give something to say")
        return text.strip()

    # -- synthesis --------------------------------------------------------------

    async def synthesize(self, text: str, voice: str | None = None, seed: int | None = None,
                         metrics: RequestMetrics | None = None) -> AsyncIterator[np.ndarray]:
        """Yield 24 kHz mono int16 chunks as they are decoded, sentence by sentence.

        Raises InputError for empty text or an unknown voice (before any work), and
        AudioGenerationError when a sentence fails with every voice and retry.
        """
        text = self.validate_text(text)
        voice = self.validate_voice(voice)
        if seed is None:
            seed = self.settings.tts.seed if self.settings.tts.seed >= 0 else random.randrange(2**31)
        m = metrics or self.monitor.start(voice, text)
        try:
            for index, sentence in enumerate(split_sentences(text, sentence_chars(self.settings))):
                async for chunk, voice in self._sentence_with_retries(sentence, voice, seed + index, m):
                    yield chunk
        except AudioGenerationError as e:
            m.error = str(e)
            raise
        finally:
            self.monitor.finish(m)

    async def _sentence_with_retries(self, sentence: str, voice: str, seed: int, m: RequestMetrics):
        """Yields (chunk, voice used). Retries a sentence that fails before any audio, with
        exponential backoff; then moves to the fallback voice for the rest of the request."""
        cfg = self.settings.tts
        voices = [voice] + ([cfg.fallback_voice] if cfg.fallback_voice and cfg.fallback_voice != voice else [])
        last_error: BaseException | None = None
        for v in voices:
            for attempt in range(cfg.max_retries + 1):
                produced = False
                try:
                    async for chunk in self._speak(sentence, v, seed + attempt, m):
                        produced = True
                        yield chunk, v
                    m.voice = v  # the voice actually heard (the fallback, if it came to that)
                    return
                except (AudioGenerationError, RuntimeError) as e:
                    if produced:  # audio already went out: a retry would repeat it
                        raise AudioGenerationError(f"speech generation failed mid-sentence: {e}") from e
                    last_error = e
                    m.retries += 1
                    log.warning("voice %s, attempt %d failed: %s", v, attempt + 1, e)
                    if attempt < cfg.max_retries:
                        await asyncio.sleep(cfg.retry_backoff_s * 2**attempt)
            if v != voices[-1]:
                log.warning("voice %s keeps failing; falling back to %s", v, voices[-1])
        raise AudioGenerationError(
            f"speech generation failed after {len(voices) * (cfg.max_retries + 1)} attempts "
            f"(voices: {', '.join(voices)}): {last_error}")

    async def _speak(self, sentence: str, voice: str, seed: int, m: RequestMetrics) -> AsyncIterator[np.ndarray]:
        params = self.sampling_params()
        # Tokenizing the prompt is model work too: it runs on the device thread.
        stream = await self.device_thread.open(self.open_stream, sentence, voice, seed, params,
                                               asyncio.get_running_loop())
        try:
            while not stream.done:
                if isinstance(stream, BatchedStream):
                    audio = await stream.next_audio()  # the batcher pushes audio as it is made
                else:
                    audio = await self.device_thread.run(stream.advance)
                now = time.perf_counter()
                if m.first_token is None and stream.first_token_at is not None:
                    m.first_token = stream.first_token_at
                if audio is not None:
                    m.first_audio = m.first_audio or now
                    m.audio_samples += len(audio)
                    yield to_int16(audio)
        finally:
            # Runs on completion, on an error, and when the consumer stops iterating.
            stream.close()
            self.active.discard(stream)
            m.tokens += stream.position
            m.snac_s += stream.decoder.decode_s
            m.invalid_tokens += stream.assembler.invalid_tokens

    def sampling_params(self) -> SamplingParams:
        """Orpheus sampling as the settings give it."""
        o = self.settings.orpheus
        return SamplingParams(o.temperature, o.top_p, o.repetition_penalty, o.max_tokens)

    def open_stream(self, sentence: str, voice: str, seed: int, params: SamplingParams,
                    loop: asyncio.AbstractEventLoop | None = None) -> SpeechStream | BatchedStream:
        """Start speaking a sentence (on the device thread): a stream of the batcher when
        there is one (its audio goes to `loop`), else a single stream."""
        prompt = self.orpheus.prompt_ids(voice, sentence)
        if self.batcher is not None:
            stream = self.batcher.admit(prompt, params, seed, loop)
            self.active.add(stream)
            return stream
        s = self.settings.snac
        decoder = StreamingSNACDecoder(self.snac, s.decoder_mode, s.max_frames_per_window)
        stream = SpeechStream(self.orpheus.stream(prompt, params, seed), decoder)
        self.active.add(stream)
        return stream

    def close(self) -> None:
        """Stop every stream and the device thread. The models stay loaded (see unload)."""
        for stream in list(self.active):
            stream.close()
        if self._owns_thread:
            self.device_thread.shutdown()

    def unload(self) -> None:
        """Close, then free the models and their memory (for the owner of the models)."""
        self.close()
        self.batcher = None  # its static KV cache
        self.orpheus.unload()
        self.snac = None
        if self.memory is not None:
            self.memory.cleanup()
