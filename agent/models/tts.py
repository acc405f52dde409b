"""TTSServiceDirect: text in, 24 kHz int16 audio chunks out, streamed as decoded.

The path of one sentence: prompt -> TokenStream (Orpheus, one token per step) ->
FrameAssembler (7 codes a frame) -> StreamingSNACDecoder -> int16 chunks.
All model work runs on one device thread, so the event loop never waits on a model.
With a `SpeechBatcher` (engine.mode = "batched", defined below) every sentence being
spoken joins one decode step shared by all calls; without one ("single") each stream
runs its own steps, pulled by its consumer. Either way a consumer that stops iterating
stops its stream, and its KV cache (or cache slot) is freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator
from typing import Any, cast

import numpy as np
import torch

from agent.config import Settings
from agent.engine.batching import SlotBatcher, SlotStream
from agent.engine.device import DeviceThread
from agent.engine.llama import StaticLlama
from agent.errors import AudioGenerationError, InputError
from agent.models.memory import GPUMemoryManager
from agent.models.monitor import PerformanceMonitor, RequestMetrics
from agent.models.orpheus import (
    AUDIO_BASE,
    AUDIO_IDS,
    END_OF_SPEECH,
    EOS_COLUMN,
    FRAME_TOKENS,
    FrameAssembler,
    OrpheusDirectModel,
    SamplingParams,
    TokenStream,
    column_to_token,
    sample_streams,
    stream_generator,
)
from agent.models.snac import StreamingSNACDecoder, Window, decode_batch, to_int16
from agent.text import split_sentences

log = logging.getLogger(__name__)


def sentence_chars(settings: Settings) -> int:
    """The longest text spoken as one stream: tts.max_sentence_chars, and no more than
    orpheus.max_tokens can say at orpheus.tokens_per_char, so that a long sentence is split
    at a clause or a space rather than cut off mid-word at the token limit."""
    o = settings.orpheus
    return max(1, min(settings.tts.max_sentence_chars, int(o.max_tokens / o.tokens_per_char)))


def audio_head(model: torch.nn.Module) -> torch.Tensor:
    """The rows of Orpheus's head that its sampler reads: the 7 x 4096 audio ids, then
    end_of_speech (orpheus.audio_block's layout)."""
    lm_head: Any = model.lm_head  # an nn.Linear (nn.Module types attributes as Tensor | Module)
    weight = lm_head.weight
    return torch.cat([weight[AUDIO_BASE:AUDIO_BASE + AUDIO_IDS], weight[END_OF_SPEECH:END_OF_SPEECH + 1]]).contiguous()


class BatchedStream(SlotStream):
    """One sentence being spoken by the batcher. The device thread fills it; the event
    loop reads its audio with next_audio() and stops it with close()."""

    def __init__(self, prompt: torch.Tensor, params: SamplingParams, seed: int, decoder: StreamingSNACDecoder,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(prompt, params.max_tokens, loop)
        self.params = params
        self.generator = stream_generator(seed)
        self.decoder = decoder
        self.assembler = FrameAssembler()

    @property
    def position(self) -> int:
        """Audio tokens so far: the next token's place in its 7-token frame is position % 7."""
        return len(self.tokens)

    async def next_audio(self) -> np.ndarray | None:
        """The next chunk of float32 audio, or None at the end (then `done` is set)."""
        return await self._next()


class SpeechBatcher(SlotBatcher):
    """Continuous batching of Orpheus decoding: position-constrained sampling per stream,
    frames of 7 codes, and the SNAC windows that became due, decoded together. While a new
    stream waits for its first audio, streams more than `defer_lead_s` ahead of their
    listeners put off their windows, so the first audio of a new reply comes first.
    """

    def __init__(self, orpheus: OrpheusDirectModel, snac: Any, max_streams: int, max_seq_len: int, prefill_chunk: int,
                 defer_lead_s: float, snac_mode: str, max_frames_per_window: int, cuda_graphs: bool) -> None:
        llama = StaticLlama(orpheus.model.model, audio_head(orpheus.model), max_streams, max_seq_len)
        super().__init__(llama, prefill_chunk, cuda_graphs)
        self.snac = snac
        self.defer_lead_s = defer_lead_s
        self.snac_mode = snac_mode
        self.max_frames_per_window = max_frames_per_window
        self.pad_snac_windows = llama.device.type == "cuda"  # one SNAC call per step (decode_batch)
        self.seen = torch.zeros(max_streams, AUDIO_IDS + 1, dtype=torch.bool, device=llama.device)

    def admit(self, prompt_ids: list[int], params: SamplingParams, seed: int,
              loop: asyncio.AbstractEventLoop) -> BatchedStream:
        """A new stream (on the device thread); it starts at the next step with a free slot."""
        decoder = StreamingSNACDecoder(self.snac, self.snac_mode, self.max_frames_per_window)
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.llama.device)
        stream = BatchedStream(prompt, params, seed, decoder, loop)
        self._enqueue(stream, "a speech prompt")
        return stream

    def _on_assign(self, slot: int) -> None:
        self.seen[slot] = False

    def _on_move(self, src: int, dst: int) -> None:
        self.seen[dst] = self.seen[src]

    def _sample(self, streams: list[BatchedStream], block: torch.Tensor) -> None:
        """Sample one token per stream from its logits block and feed its frame assembler."""
        slots = torch.tensor([s.slot for s in streams], device=block.device)
        columns = sample_streams(block, [s.position for s in streams], self.seen.index_select(0, slots),
                                 [s.params for s in streams], [s.generator for s in streams])
        self.seen[slots, columns] = True
        now = time.perf_counter()
        for stream, column in zip(streams, columns.tolist()):
            token = column_to_token(column)
            if column == EOS_COLUMN:
                stream.finished = True
                continue
            stream._take(token, now)
            if stream.finished:  # its token limit, not end_of_speech: the audio fades out
                stream.decoder.fade_at_end()
            frame = stream.assembler.push(token)
            if frame is not None:
                stream.decoder.add(frame)

    def _emit(self, streams: list[BatchedStream]) -> None:
        """Decode the SNAC windows now due, first audio before streams far ahead."""
        windows = []
        for stream in streams:
            if stream.finished or stream.assembler.partial_tokens == 0:
                window = stream.decoder.next_window(final=stream.finished)
                if window is not None:
                    windows.append((stream, window))
        if any(s.decoder.emitted == 0 and not s.finished for s in self.active):  # a new stream warms up
            windows = [(s, w) for s, w in windows
                       if s.finished or s.decoder.emitted == 0 or s.decoder.lead_s <= self.defer_lead_s]
        jobs = [(s.decoder, w) for s, w in windows]
        audio = decode_batch(self.snac, jobs, self.pad_snac_windows) if jobs else []
        if self.profile is not None:
            decoded = [cast(Window, s.decoder.last_window) for s, _ in windows]  # decode_batch set them
            self.profile.snac_calls += len({w.frames for w in decoded})  # one call per window length
            self.profile.snac_frames += sum(w.frames for w in decoded)
        self._mark("snac")
        for (stream, _), chunk in zip(windows, audio):
            if len(chunk):
                stream._deliver(chunk)
        for stream in streams:
            if stream.assembler.partial_tokens == 0:
                stream.decoder.mark_done()
            if stream.finished:
                stream._deliver(None)
                self._release(stream)


class SpeechStream:
    """One sentence being spoken, advanced on the device thread. advance() runs decode
    steps (and a SNAC window when one is due) until new audio comes out, the stream
    ends, or one frame's worth of steps has run, so that other streams' steps can
    interleave and each hop to the device thread does a useful amount of work."""

    def __init__(self, tokens: TokenStream, decoder: StreamingSNACDecoder, device_thread: DeviceThread) -> None:
        self.tokens = tokens
        self.device_thread = device_thread  # where next_audio() runs advance()
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

    async def next_audio(self) -> np.ndarray | None:
        """advance() on the device thread, from the event loop: the same call as a BatchedStream's."""
        return await self.device_thread.run(self.advance)

    def close(self) -> None:
        self.done = True
        self.tokens.close()


class TTSServiceDirect:
    """Streaming speech from the in-process Orpheus and SNAC models."""

    def __init__(self, orpheus: OrpheusDirectModel, snac: Any, settings: Settings,
                 monitor: PerformanceMonitor | None = None,
                 memory: GPUMemoryManager | None = None,
                 device_thread: DeviceThread | None = None,
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
                         metrics: RequestMetrics | None = None) -> AsyncGenerator[np.ndarray, None]:
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

    async def _speak(self, sentence: str, voice: str, seed: int, m: RequestMetrics) -> AsyncGenerator[np.ndarray, None]:
        params = self.sampling_params()
        # Tokenizing the prompt is model work too: it runs on the device thread.
        stream = await self.device_thread.open(self.open_stream, sentence, voice, seed, params,
                                               asyncio.get_running_loop())
        try:
            while not stream.done:
                audio = await stream.next_audio()
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
        stream: SpeechStream | BatchedStream
        if self.batcher is not None:
            assert loop is not None  # _speak passes its loop, for the batcher's audio
            stream = self.batcher.admit(prompt, params, seed, loop)
            self.active.add(stream)
            return stream
        s = self.settings.snac
        decoder = StreamingSNACDecoder(self.snac, s.decoder_mode, s.max_frames_per_window)
        stream = SpeechStream(self.orpheus.stream(prompt, params, seed), decoder, self.device_thread)
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
