"""Voxtral: the listening half. Audio (plus the conversation so far) in, text out.

Voxtral is a Whisper-style audio encoder, a projector and a Llama decoder. Its processor
(WhisperFeatureExtractor + mistral-common's Tekken tokenizer) pads audio to whole 30 s
chunks; each chunk becomes 375 [AUDIO] placeholder tokens whose embeddings the encoder
fills in. Two modes: understanding (a chat; the reply is the agent's answer) and
transcription. Two ways to decode a reply: `TextStream`, one generation with
transformers' dynamic cache (one prefill with the audio features, then one forward per
token), and `ReplyBatcher`, which decodes the replies of every call together on the
engine's static cache (agent/engine/llama.py); a reply gets the same tokens either way.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import io
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast, overload

import numpy as np
import torch

from agent.engine.batching import SlotBatcher, SlotStream
from agent.engine.device import DeviceThread
from agent.engine.generation import (
    CachedGeneration,
    InProcessModel,
    estimate_llama_bytes,
    first_line,
    load_failure,
    sample_choices,
    sample_index,
)
from agent.engine.llama import StaticLlama
from agent.errors import InputError, ModelInitializationError
from agent.rates import IN_RATE

log = logging.getLogger(__name__)

# mistral-common pads audio up to a multiple of 30 s, which leaves an empty clip empty
# (and then nothing to encode); one audio token's worth of silence (80 ms) avoids that.
MIN_SAMPLES = 1280


class TurnAudio:
    """One caller turn's audio as Voxtral takes it, with what is computed from it: its mel
    features (made off the device thread) until the encoder runs on them, then the
    encoder's output (the turn's [AUDIO] embeddings, on the device). A session keeps one
    per remembered turn, so a turn is extracted and encoded once, not again for every
    later reply; dropping it (the turn leaves the history, the call ends) frees it."""

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = prepare_audio(samples)
        self.features: torch.Tensor | None = None  # (chunks, mel bins, 3000), CPU
        self.embeddings: torch.Tensor | None = None  # (chunks x 375, hidden), on the device
        self.encodes = 0  # times the encoder ran on it
        self._wav: str | None = None

    @property
    def wav(self) -> str:
        """The audio as a base64 WAV, the form the chat template takes (made once)."""
        if self._wav is None:
            self._wav = wav_base64(self.samples)
        return self._wav

    @property
    def pending(self) -> bool:
        """Neither features nor embeddings yet. The device thread sets the embeddings
        before it drops the features, so a reader never sees both gone."""
        return self.features is None and self.embeddings is None


@dataclass(frozen=True)
class ChatTurn:
    """One turn of the conversation as Voxtral's prompt takes it."""
    role: str  # "user" or "assistant"
    # User turns: float32 mono 16 kHz in [-1, 1], or a TurnAudio that keeps its encoding.
    audio: np.ndarray | TurnAudio | None = None
    text: str | None = None  # assistant turns (and optional user text)


@dataclass(frozen=True)
class ReplyPrompt:
    """A reply's prompt, built off the device thread: the token ids, and the audio of
    each [AUDIO] run in order (features ready, or already encoded)."""
    input_ids: torch.Tensor  # (1, T)
    audio: tuple[TurnAudio, ...]


@dataclass(frozen=True)
class ReplyParams:
    """How Voxtral samples one reply's text."""
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 200


class TextStream(CachedGeneration):
    """One generation. step() runs one forward pass (the first one is the prefill) and
    returns the newly decoded text ("" while a multi-byte character is incomplete), or
    None when finished. close() frees the KV cache at once, from any thread.
    """

    def __init__(self, model: VoxtralModel, prefill: dict[str, torch.Tensor], prompt_ids: list[int],
                 params: ReplyParams, seed: int, device_thread: DeviceThread | None = None) -> None:
        # Prefill input: the prompt's embeddings (a reply), or its ids and mel features.
        super().__init__(prefill)
        self.model = model
        self.device_thread = device_thread  # where next_piece() runs its steps
        self.params = params
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(self.prompt_ids)
        self.eos_token_id = model.eos_token_id
        self.generator = torch.Generator()  # CPU: sample_index draws its uniforms there
        self.generator.manual_seed(seed)
        self.stopped_by_model = False  # True when the model chose EOS
        self.tokens = 0  # generated so far (EOS not counted)
        self.token_ids: list[int] = []
        self.text = ""
        # Tekken tokens are byte strings; a character may span tokens. The incremental
        # decoder holds an incomplete tail back until its last byte arrives (and an
        # incomplete character at the very end is dropped, never half-emitted).
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @torch.inference_mode()
    def step(self) -> str | None:
        """Run one forward pass and return the new text, or None when done."""
        logits = self._forward(self.model.forward, stop=self.tokens >= self.params.max_new_tokens)
        if logits is None:
            return None
        token = sample_index(logits, self.params.temperature, self.params.top_p, self.generator)
        if token == self.eos_token_id:
            self.stopped_by_model = True
            self.close()
            return None
        self.tokens += 1
        self.token_ids.append(token)
        piece = self._utf8.decode(self.model.token_bytes(token))
        self.text += piece
        if self.tokens >= self.params.max_new_tokens:
            self.close()  # free the cache now rather than on the next step
        else:
            self._next_input = {"input_ids": torch.tensor([[token]], device=self.model.device)}
        return piece

    async def next_piece(self) -> str | None:
        """step() on the device thread, from the event loop: the same call as a BatchedReply's."""
        if self.device_thread is None:
            raise RuntimeError("this TextStream was made without a device thread: call step() on one")
        return await self.device_thread.run(self.step)


class VoxtralModel(InProcessModel):
    """Voxtral and its processor, loaded in-process with transformers."""

    def __init__(self, model: torch.nn.Module, processor: Any, source: str) -> None:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        super().__init__(model, source)
        self.processor = processor
        tekken = processor.tokenizer.tokenizer.instruct_tokenizer.tokenizer
        if not isinstance(tekken, Tekkenizer):
            raise ModelInitializationError(f"model {source!r} has no Tekken tokenizer (tekken.json)")
        self._tekken = tekken
        self.eos_token_id: int = processor.tokenizer.eos_token_id

    @classmethod
    def load(cls, source: str, device: torch.device, dtype: torch.dtype,
             check_memory: Callable[[str, int], None] | None = None) -> VoxtralModel:
        """Load from a Hub id or a local directory. `check_memory(name, bytes)` may refuse."""
        from transformers import AutoConfig, VoxtralForConditionalGeneration, VoxtralProcessor

        from agent.models.memory import placement

        try:
            config = AutoConfig.from_pretrained(source)
            if config.model_type != "voxtral":
                raise ValueError(f"model type is {config.model_type!r}, not 'voxtral'")
            if check_memory is not None:
                check_memory(f"Voxtral ({source})", estimate_voxtral_bytes(config, dtype))
            processor = VoxtralProcessor.from_pretrained(source)
            model = VoxtralForConditionalGeneration.from_pretrained(source, dtype=dtype, **placement(device))
        except ModelInitializationError:
            raise
        except Exception as e:  # transformers raises OSError, ValueError, HF errors...
            raise load_failure("Voxtral", source, e) from e
        return cls.ready(model, processor, source, device)

    @classmethod
    def ready(cls, model: torch.nn.Module, processor: Any, source: str, device: torch.device) -> VoxtralModel:
        """A loaded (or built) Voxtral on its device."""
        model.to(device).eval()
        return cls(model, processor, source)

    def reply_stream(self, audio: np.ndarray | TurnAudio, history: Sequence[ChatTurn], instructions: str,
                     params: ReplyParams, seed: int, instructions_first: bool = False,
                     device_thread: DeviceThread | None = None) -> TextStream:
        """Understanding mode: answer `audio`, the caller's new turn, after `history`."""
        return self.text_stream(self.reply_prompt(audio, history, instructions, instructions_first), params, seed,
                                device_thread)

    def text_stream(self, prompt: ReplyPrompt, params: ReplyParams, seed: int,
                    device_thread: DeviceThread | None = None) -> TextStream:
        """The single path for a prompt (on the device thread: the audio is encoded here).
        With `device_thread`, the event loop reads it with next_piece() as a BatchedReply."""
        return TextStream(self, {"inputs_embeds": self.prompt_embeddings(prompt)[None]},
                          prompt.input_ids[0].tolist(), params, seed, device_thread)

    def reply_prompt(self, audio: np.ndarray | TurnAudio, history: Sequence[ChatTurn], instructions: str,
                     instructions_first: bool = False) -> ReplyPrompt:
        """The prompt for a reply to `audio` after `history`. CPU work only (tokenizing,
        and mel features for audio not seen before), so it runs off the device thread."""
        from mistral_common.exceptions import MistralCommonException

        audio = audio if isinstance(audio, TurnAudio) else TurnAudio(audio)
        turns = [ChatTurn(t.role, _turn_audio(t.audio), t.text) for t in history]
        conversation = self.conversation(audio, turns, instructions, instructions_first)
        try:
            encoded = self.processor.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)
        except (MistralCommonException, ValueError) as e:  # mistral-common rejects the structure
            raise InputError(f"cannot build the Voxtral prompt: {first_line(e)}") from e
        finally:
            forget_parsed_urls()
        # Every audio here is a TurnAudio: _turn_audio made the history's, and `audio` is one.
        spoken = tuple(cast(TurnAudio, t.audio) for t in [*turns, ChatTurn("user", audio)]
                       if t.role == "user" and t.audio is not None)
        for turn, samples in zip(spoken, encoded["audio"], strict=True):  # as the tokenizer padded them
            if turn.pending:
                turn.features = self._features(samples)
        return ReplyPrompt(torch.tensor([encoded["input_ids"]]), spoken)

    def _features(self, samples: np.ndarray) -> torch.Tensor:
        """Mel features of one audio, in 30 s chunks (chunks, mel bins, 3000), as the
        processor's apply_chat_template makes them."""
        kwargs = dict(self.processor.audio_kwargs)
        positions = kwargs.pop("max_source_positions")
        features = self.processor.feature_extractor(samples, **kwargs)["input_features"]
        return features.reshape(self.processor.feature_extractor.feature_size, -1, positions).transpose(0, 1)

    @torch.inference_mode()
    def encode(self, audio: TurnAudio) -> torch.Tensor:
        """The turn's [AUDIO] embeddings (on the device thread): the encoder runs the first
        time only."""
        if audio.embeddings is None:
            assert audio.features is not None  # reply_prompt made them; only the embeddings replace them
            features = audio.features.to(self.device, self.dtype)  # reply_prompt made them
            out = self.model.model.get_audio_features(features, return_dict=True).pooler_output
            audio.embeddings = out.reshape(-1, out.shape[-1])
            audio.encodes += 1
            audio.features = None
        return audio.embeddings

    @torch.inference_mode()
    def prompt_embeddings(self, prompt: ReplyPrompt) -> torch.Tensor:
        """The prompt as the language model's input embeddings (T, hidden): the text's
        token embeddings with each turn's encoded audio in its [AUDIO] placeholders, as
        transformers' Voxtral forward builds them."""
        m = self.model.model
        ids = prompt.input_ids.to(self.device)
        embeds = m.get_input_embeddings()(ids)
        if prompt.audio:
            audio = torch.cat([self.encode(a) for a in prompt.audio])
            mask = (ids == m.config.audio_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, audio.to(embeds.dtype))
        return embeds[0]

    def transcription_prompt(self, audio: np.ndarray | TurnAudio, language: str | None) -> ReplyPrompt:
        """Transcription mode's prompt (off the device thread); `language` is an ISO 639-1
        code, or None to detect it. A caller turn's TurnAudio keeps its encoding, so a turn
        transcribed after its reply is encoded once for both."""
        from mistral_common.exceptions import MistralCommonException

        turn = _turn_audio(audio)
        try:
            inputs = self.processor.apply_transcription_request(
                language=language, audio=turn.samples, model_id=self.source,
                sampling_rate=IN_RATE, format="wav")
        except (MistralCommonException, ValueError) as e:  # pydantic's error for an unknown language too
            raise InputError(f"cannot build the Voxtral transcription prompt: {first_line(e)}") from e
        finally:
            forget_parsed_urls()
        if turn.pending:
            turn.features = inputs["input_features"]  # (chunks, mel bins, 3000), as _features makes them
        return ReplyPrompt(inputs["input_ids"], (turn,))

    def transcribe_stream(self, audio: np.ndarray | TurnAudio, language: str | None, params: ReplyParams,
                          seed: int) -> TextStream:
        """Transcription mode, on the single path (this thread runs the model)."""
        return self.text_stream(self.transcription_prompt(audio, language), params, seed)

    def conversation(self, audio: np.ndarray | TurnAudio, history: Sequence[ChatTurn], instructions: str,
                     instructions_first: bool = False) -> list[dict]:
        """The chat for the processor: history, then the new user turn. Voxtral takes no
        system prompt, so the instructions go in the first user message, after its audio:
        Voxtral's documented examples (transformers' VoxtralForConditionalGeneration and
        VoxtralProcessor docs, Mistral's model card) put the audio first and the text about
        it after, the layout the model was tuned to answer. `instructions_first` puts the
        text before the audio instead (session.instructions_first)."""
        messages: list[dict[str, Any]] = []
        pending = instructions.strip()
        for turn in [*history, ChatTurn("user", audio=audio)]:
            if turn.role == "assistant":
                if not turn.text:
                    continue  # an interrupted reply that said nothing
                if not messages:
                    # A chat must open with a user message; an agent that greets first
                    # gets one holding only the instructions (or loses the greeting).
                    if not pending:
                        continue
                    messages.append({"role": "user", "content": [{"type": "text", "text": pending}]})
                    pending = ""
                if messages[-1]["role"] == "assistant":  # the agent spoke twice (an idle prompt)
                    messages[-1]["content"] += " " + turn.text
                else:
                    messages.append({"role": "assistant", "content": turn.text})
            elif turn.role == "user":
                texts = [{"type": "text", "text": t} for t in (pending, turn.text) if t]
                pending = ""
                audio_part = [{"type": "audio", "base64": _turn_audio(turn.audio).wav}] if turn.audio is not None else []
                content = texts + audio_part if instructions_first else audio_part + texts
                if content:
                    messages.append({"role": "user", "content": content})
            else:
                raise InputError(f"unknown chat role {turn.role!r} (use 'user' or 'assistant')")
        return messages

    def forward(self, inputs: dict[str, torch.Tensor], cache: Any) -> Any:
        return self._forward_cached(cache, **inputs)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one generated token; control tokens give b""."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self._tekken.id_to_byte_piece(token_id, SpecialTokenPolicy.IGNORE)

    def unload(self) -> None:
        self.model = None
        self.processor = None


class BatchedReply(SlotStream):
    """A reply decoded by the ReplyBatcher. The event loop reads its text with
    next_piece() and stops it with close(); `text` and `stopped_by_model` are as in
    TextStream, and `tokens` holds what TextStream calls `token_ids`."""

    def __init__(self, prompt: ReplyPrompt, params: ReplyParams, seed: int, loop: asyncio.AbstractEventLoop) -> None:
        # The prompt is its token ids until ReplyBatcher._prepare makes it the embeddings.
        super().__init__(prompt.input_ids[0], params.max_new_tokens, loop)
        self.reply_prompt: ReplyPrompt | None = prompt
        self.params = params
        self.generator = torch.Generator()  # CPU, seeded as TextStream's: the same draws
        self.generator.manual_seed(seed)
        self.stopped_by_model = False
        self.text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    async def next_piece(self) -> str | None:
        """The next piece of text ("" while a character is incomplete), or None at the end."""
        return await self._next()


class ReplyBatcher(SlotBatcher):
    """Voxtral's replies for every call, decoded together: one decode step of the
    language model for all replies under way (continuous batching on the engine's static
    cache, CUDA graphs on a GPU). The audio encoder runs on a reply's new audio as its
    prefill starts (remembered turns keep their encoding); the prompt is then fed whole
    (`whole_prompts`)."""

    def __init__(self, voxtral: VoxtralModel, slots: int, max_seq_len: int, prefill_chunk: int,
                 cuda_graphs: bool) -> None:
        m = voxtral.model
        super().__init__(StaticLlama(m.model.language_model, m.lm_head.weight, slots, max_seq_len),
                         prefill_chunk, cuda_graphs)
        self.voxtral = voxtral
        # A caller waits for the first words; the replies under way only need to stay ahead
        # of speech. So each step feeds whole prompts (at least one, more while prefill_chunk
        # lasts: engine.reply_prefill_chunk), and a reply's first token is not held back by
        # the others' decode steps in between.
        self.whole_prompts = True

    def admit(self, prompt: ReplyPrompt, params: ReplyParams, seed: int,
              loop: asyncio.AbstractEventLoop, background: bool = False) -> BatchedReply:
        """A new reply (on the device thread); it starts at the next step with a free slot.
        `background` (a caller transcript): after every reply, in a spare slot."""
        stream = BatchedReply(prompt, params, seed, loop)
        stream.background = background
        self._enqueue(stream, "a Voxtral prompt")
        return stream

    def _prepare(self, stream: SlotStream) -> None:
        """The audio is encoded when the reply's prefill starts, not when it is admitted, so
        replies arriving together reach their first tokens in turn rather than all after
        every encoding."""
        assert isinstance(stream, BatchedReply)  # admit() queues only BatchedReplys
        assert stream.reply_prompt is not None  # _prepare runs once, before the prefill
        stream.prompt = self.voxtral.prompt_embeddings(stream.reply_prompt)
        stream.reply_prompt = None

    def _sample(self, streams: list[BatchedReply], logits: torch.Tensor) -> None:
        params = [s.params for s in streams]
        tokens = sample_choices(logits, [p.temperature for p in params], [p.top_p for p in params],
                                [s.generator for s in streams])
        now = time.perf_counter()
        for stream, token in zip(streams, tokens.tolist()):
            if token == self.voxtral.eos_token_id:
                stream.stopped_by_model = True
                stream.finished = True
                continue
            stream._take(token, now)
            piece = stream._utf8.decode(self.voxtral.token_bytes(token))
            stream.text += piece
            stream._deliver(piece)

    def _emit(self, streams: list[BatchedReply]) -> None:
        for stream in streams:
            if stream.finished:
                stream._deliver(None)
                self._release(stream)


def forget_parsed_urls() -> None:
    """Empty urllib's cache of parsed URLs. mistral-common asks urlparse() what kind of
    "URL" each base64 WAV of a prompt is, and urlsplit keeps its last 128 arguments with
    their results: without this, up to 128 caller turns (each twice, megabytes for a long
    turn) would stay in memory for good, and a server's memory would grow with its calls
    until that cache is full. The cache only saves re-parsing a URL."""
    clear = getattr(urllib.parse.urlsplit, "cache_clear", None)
    if clear is not None:
        clear()


@overload
def _turn_audio(audio: np.ndarray | TurnAudio) -> TurnAudio: ...


@overload
def _turn_audio(audio: None) -> None: ...


def _turn_audio(audio: np.ndarray | TurnAudio | None) -> TurnAudio | None:
    """Audio given as samples gets a TurnAudio of its own (used for this prompt only)."""
    return audio if audio is None or isinstance(audio, TurnAudio) else TurnAudio(audio)


def prepare_audio(audio: np.ndarray) -> np.ndarray:
    """float32 mono, at least MIN_SAMPLES long (zero padded)."""
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise InputError(f"Voxtral needs mono audio (one dimension), got shape {samples.shape}")
    if samples.size < MIN_SAMPLES:
        samples = np.pad(samples, (0, MIN_SAMPLES - samples.size))
    return samples


def wav_base64(audio: np.ndarray) -> str:
    """Audio as a base64 WAV, the form the chat template takes for in-memory audio.
    32-bit float samples, so nothing is lost on the way."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, prepare_audio(audio), IN_RATE, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def estimate_voxtral_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of a Voxtral model's weights, from its config alone (nothing is loaded)."""
    audio, hidden = config.audio_config, config.text_config.hidden_size
    h, i, mel = audio.hidden_size, audio.intermediate_size, audio.num_mel_bins
    convs = mel * h * 3 + h + h * h * 3 + h
    per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h  # attention, MLP, two norms
    encoder = convs + audio.max_source_positions * h + audio.num_hidden_layers * per_layer + 2 * h
    projector = i * hidden + hidden * hidden
    return estimate_llama_bytes(config.text_config, dtype) + (encoder + projector) * torch.finfo(dtype).bits // 8
